"""The data pipeline: deterministic, resumable batches with provenance (Grain + numpy).

Public API (what the trainer calls):

    cfg = ettin_jax.data.default_data_config()                 # ml_collections.ConfigDict
    pipe = ettin_jax.data.make_pipeline(cfg, seq_len=1024, global_batch_size=64, seed=21, mlm_rate=0.3,
                                        shard_index=jax.process_index(), shard_count=jax.process_count())
    it = pipe.iterator(start_step=0)       # grain.DatasetIterator; get_state()/set_state() are JSON
    batch = next(it)                       # this host's rows of the global batch of the next step
    pipe.stats()                           # dict of counters (DataStats)
    pipe.tokenizer

Batch (numpy; b = global_batch_size // shard_count rows, T = seq_len, P = ceil(mlm_rate * T)):
    tokens int32 [b, T] (pad = pad_id), segment_ids int32 [b, T] (1-based per document in a row, 0 = padding),
    positions int32 [b, T] (0-based, restarting per document); with mlm_rate > 0 also mlm_inputs int32 [b, T],
    mlm_positions int32 [b, P], mlm_labels int32 [b, P], mlm_weights float32 [b, P];
    step (int) and provenance (dict, not for the model: step, shard_index, shard_count, rows: [{row, pieces:
    [[source, doc_id, token_start, token_end], ...], hash}], hash).

Checkpointing with Orbax: `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` in `ocp.args.Composite`.
Provenance: `ProvenanceWriter(workdir).write(batch)`; `ettin batches --workdir=DIR --step=N` prints it back.
The determinism design is in pipeline.py's docstring.
"""
from ettin_jax.data.config import default_data_config
from ettin_jax.data.pipeline import BatchIterator, Pipeline, batch_hash, make_pipeline, row_hash
from ettin_jax.data.provenance import ProvenanceWriter
from ettin_jax.data.stats import DataStats

__all__ = ["default_data_config", "make_pipeline", "Pipeline", "BatchIterator", "ProvenanceWriter", "DataStats",
           "batch_hash", "row_hash"]
