"""Embeddings and retrieval: mean pooling, contrastive fine-tuning with in-batch negatives, nDCG@10 / MRR@10.

`Embedder(model).encode(sentences)` is the interface MTEB and sentence-transformers-style code call (a list of
strings in, an [N, H] float32 array out; extra keyword arguments such as batch_size, normalize_embeddings or
convert_to_numpy are accepted). Fine-tuning follows Ettin's retrieval recipe in miniature (reference section 5):
(query, positive) pairs, the other positives of the batch as negatives, cross-entropy over cosine similarities
times a scale of 20, decoupled AdamW with 6% warmup then linear decay.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ettin_jax.evaluation import metrics
from ettin_jax.evaluation.classification import scaled_update, schedule_value, unit_adamw
from ettin_jax.evaluation.models import Model, check_pooling, encode, hidden_states, pad, pool, pooled


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
    lr: float = 1e-4
    steps: int = 150
    batch_size: int = 32
    scale: float = 20.0
    query_len: int = 64
    doc_len: int = 128
    weight_decay: float = 1e-2
    warmup_frac: float = 0.06
    seed: int = 0


class Embedder:
    """Sentence embeddings from a model (pooled final hidden states)."""

    def __init__(self, model: Model, params: Optional[dict] = None, pooling: str = "mean", max_len: int = 128):
        check_pooling(model.arch, pooling)
        self.model, self.params, self.pooling, self.max_len = model, params or model.params, pooling, max_len

    def encode(self, sentences: Sequence[str], batch_size: int = 32, normalize_embeddings: bool = False,
               max_len: Optional[int] = None, **kwargs) -> np.ndarray:
        if isinstance(sentences, str):
            sentences = [sentences]
        max_len = max_len or self.max_len
        out = []
        for start in range(0, len(sentences), batch_size):
            chunk = list(sentences[start:start + batch_size])
            toks, seg = pad(encode(self.model, chunk, max_len), self.model.cfg.pad_token_id, length=max_len)
            n = len(chunk)
            if n < batch_size:  # one compiled shape per max_len
                toks = np.concatenate([toks, np.repeat(toks[:1], batch_size - n, 0)])
                seg = np.concatenate([seg, np.repeat(seg[:1], batch_size - n, 0)])
            out.append(np.asarray(pooled(self.params, self.model.cfg, self.model.mask, self.pooling, toks, seg))[:n])
        emb = np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.model.cfg.hidden_size), np.float32)
        if normalize_embeddings:
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return emb

    def export(self, out_dir: str) -> str:
        """Writes the encoder with these (fine-tuned) parameters as a Hugging Face folder that transformers and
        `sentence_transformers.SentenceTransformer(out_dir)` load, pooling as here (`ettin_jax.hf.save_hf_folder`).
        Decoders are refused: their exported tokenizer adds no [SEP], which the embeddings here end with."""
        if self.model.arch != "encoder":
            raise ValueError(f"{self.model.name} is a {self.model.arch}; only an encoder's embeddings are exported "
                             "for sentence-transformers (an exported decoder's tokenizer adds no [SEP], so its "
                             "embeddings would differ from these)")
        from ettin_jax import hf
        source = f"`{self.model.path}`" if self.model.path else self.model.name
        note = (f"sentence embeddings ({self.pooling} pooling) of {source}"
                + (", contrastively fine-tuned by ettin eval's retrieval task" if self.params is not self.model.params
                   else ""))
        return hf.save_hf_folder(jax.device_get(self.params), self.model.cfg, "encoder", out_dir,
                                 self.model.tokenizer.folder, provenance=dict(notes=[note]), pooling=self.pooling)


def in_batch_loss(q, d, scale: float):
    """Cross-entropy of each query against every document of the batch (its own positive is the diagonal)."""
    q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    d = d / jnp.maximum(jnp.linalg.norm(d, axis=-1, keepdims=True), 1e-12)
    logits = scale * q @ d.T
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(q.shape[0])).mean()


@functools.partial(jax.jit, static_argnames=("cfg", "mask", "pooling", "scale", "weight_decay"))
def _contrastive_step(params, opt_state, lr, qt, qs, dt, ds, *, cfg, mask, pooling, scale, weight_decay):
    def loss_fn(p):
        q = pool(hidden_states(p, cfg, mask, qt, qs), qs, pooling)
        d = pool(hidden_states(p, cfg, mask, dt, ds), ds, pooling)
        return in_batch_loss(q.astype(jnp.float32), d.astype(jnp.float32), scale)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    params, opt_state = scaled_update(unit_adamw(weight_decay), grads, opt_state, params, lr)
    return params, opt_state, loss


def contrastive_fine_tune(model: Model, pairs: Sequence[dict], config: ContrastiveConfig = ContrastiveConfig(),
                          pooling: str = "mean", log=print) -> Embedder:
    """Fine-tunes on {query, positive} pairs with in-batch negatives; returns the tuned Embedder."""
    check_pooling(model.arch, pooling)
    if len(pairs) < config.batch_size:
        raise ValueError(f"{len(pairs)} pairs; contrastive fine-tuning needs at least one batch of "
                         f"{config.batch_size}")
    qt, qs = pad(encode(model, [p["query"] for p in pairs], config.query_len), model.cfg.pad_token_id,
                 length=config.query_len)
    dt, ds = pad(encode(model, [p["positive"] for p in pairs], config.doc_len), model.cfg.pad_token_id,
                 length=config.doc_len)
    params = model.params
    opt_state = unit_adamw(config.weight_decay).init(params)
    rng = np.random.default_rng(config.seed)
    order = np.array([], np.int64)
    for s in range(config.steps):
        if len(order) < config.batch_size:
            order = np.concatenate([order, rng.permutation(len(pairs))])
        idx, order = order[:config.batch_size], order[config.batch_size:]
        params, opt_state, loss = _contrastive_step(
            params, opt_state, schedule_value(config.lr, config.steps, config.warmup_frac, s), qt[idx], qs[idx],
            dt[idx], ds[idx], cfg=model.cfg, mask=model.mask, pooling=pooling, scale=config.scale,
            weight_decay=config.weight_decay)
        if log and (s + 1) % max(1, config.steps // 4) == 0:
            log(f"  {model.name} contrastive step {s + 1}/{config.steps} loss {float(loss):.4f}")
    return Embedder(model, params, pooling)


def rank(embedder: Embedder, queries: Mapping[str, str], corpus: Mapping[str, str], k: int = 10,
         query_len: int = 64, doc_len: int = 128) -> dict:
    """{query id: the top-k document ids by cosine similarity}."""
    qids, dids = list(queries), list(corpus)
    q = embedder.encode([queries[i] for i in qids], max_len=query_len, normalize_embeddings=True)
    d = embedder.encode([corpus[i] for i in dids], max_len=doc_len, normalize_embeddings=True)
    scores = q @ d.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return {qid: [dids[j] for j in row] for qid, row in zip(qids, top)}


def evaluate(embedder: Embedder, queries: Mapping[str, str], corpus: Mapping[str, str],
             qrels: Mapping[str, Mapping[str, float]], k: int = 10, query_len: int = 64, doc_len: int = 128) -> dict:
    return metrics.retrieval_scores(rank(embedder, queries, corpus, k, query_len, doc_len), qrels, k)
