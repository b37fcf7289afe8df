"""Ettin's training recipe as named config parts: size, phase and objective (reference section 3).

`configs/ettin.py` composes `base() + size + phase + objective`; every number here is from
`shared/reference/ettin.md` (the official YAMLs). Token counts are in non-pad tokens, as Ettin counts them.
"""
from __future__ import annotations

import ml_collections

from ettin_jax import sizes
from ettin_jax.data import default_data_config

OBJECTIVES = ("mlm", "clm", "mntp", "paired")
PHASES = ("pretrain", "extension", "decay", "cross")

GLOBAL_BATCH = 4608
LONG_CONTEXT = 7999


def base() -> ml_collections.ConfigDict:
    """Fields every run has (scripts may rely on seed, total_steps, global_batch_size, seq_len,
    log_every_steps, checkpoint_every_steps and mesh.{data,fsdp,tensor})."""
    c = ml_collections.ConfigDict()
    c.seed = 21
    c.size = "17m"
    c.objective = "mlm"
    c.phase = "pretrain"
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=50368, dtype="bfloat16", attention_dropout=0.1, global_rope_theta=10_000.0,
        local_rope_theta=10_000.0, decoder_window=-1, attention_impl="auto", remat="none"))
    c.model_overrides = ml_collections.ConfigDict(dict(encoder={}, decoder={}))  # per-architecture model fields
    c.global_batch_size = GLOBAL_BATCH
    c.micro_batch_size = 0  # > 0: accumulate gradients over global_batch_size / micro_batch_size micro-batches
    c.seq_len = 1024
    # The run ends when it has trained on total_tokens non-pad tokens (the LR schedule's horizon, as Ettin counts);
    # total_steps > 0 caps the steps on top of that (stopping early leaves the schedule as it is), and is the
    # budget when total_tokens is 0.
    c.total_tokens = 0.0
    c.total_steps = 0
    c.mlm_rate = 0.3
    c.optimizer = ml_collections.ConfigDict(dict(
        peak_lr=3e-3, weight_decay=3e-4, b1=0.9, b2=0.98, eps=1e-6))
    c.schedule = ml_collections.ConfigDict(dict(name="warmup_constant", warmup_tokens=4e9, decay_tokens=0.0,
                                                start_frac=1.0, end_frac=1.0, final_frac=0.02,
                                                # > 0: warmup / decay as a fraction of the run (short runs)
                                                warmup_frac=0.0, decay_frac=0.0))
    # Phase 1 grows the batch from the micro-batch size (start 0) to global_batch_size over `tokens` tokens, in at most
    # num_sizes compiled sizes (ettin_jax/batch_warmup.py).
    c.batch_size_warmup = ml_collections.ConfigDict(dict(tokens=0.0, start=0, num_sizes=8))
    c.init_from = ""  # workdir (or HF folder) of the previous phase
    c.init_mode = "none"  # none | full (weights + optimizer, phases 2-3) | weights (cross-objective)
    c.cross_objective = ml_collections.ConfigDict(dict(encoder_objective="mlm"))
    c.data = default_data_config()
    # -1 fills the rest; num_devices -1 = all; dcn_* split an axis across slices (multi-slice TPU).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, sequence=1, tensor=1, num_devices=-1,
                                            dcn_data=1, dcn_fsdp=1))
    c.sharding_rules = ()
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.checkpoint_every_tokens = 8.5e9  # Ettin keeps a checkpoint every 8.5B tokens
    c.keep_last = 3
    c.nonfinite = "stop"  # stop | skip: what a NaN/inf loss does
    c.ce_chunk = 512  # rows of logits per cross-entropy chunk: as fast as 4096 on CPU, 8x less memory
    return c


def apply_size(c, size: str):
    if size not in sizes.SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(sizes.SIZES)}")
    s = sizes.SIZES[size]  # the per-size numbers live in the size table
    c.size = size
    c.optimizer.peak_lr, c.optimizer.weight_decay = s.peak_lr, s.weight_decay
    c.schedule.warmup_tokens = s.lr_warmup_tokens
    c.batch_size_warmup.tokens = s.batch_warmup_tokens


def apply_phase(c, phase: str):
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {', '.join(PHASES)}")
    big = c.size != "1b"
    c.phase = phase
    s = c.schedule
    if phase == "pretrain":
        c.total_tokens, c.seq_len, c.mlm_rate = 1.7e12, 1024, 0.3
        s.name = "warmup_constant"
        c.model.global_rope_theta = c.model.local_rope_theta = 10_000.0
        c.init_mode = "none"
        return
    c.seq_len = LONG_CONTEXT
    c.batch_size_warmup.tokens = 0.0  # phase 1 only
    c.model.global_rope_theta = c.model.local_rope_theta = 160_000.0
    if phase == "extension":
        c.total_tokens, c.mlm_rate = (250e9 if big else 83.3e9), 0.3
        s.name, s.start_frac, s.end_frac = "one_minus_sqrt", 1.0, 0.5
        if c.size == "17m":
            c.model.local_rope_theta = 10_000.0
        c.init_mode = "full"
    elif phase == "decay":
        c.total_tokens, c.mlm_rate = (50e9 if big else 16.7e9), 0.15
        s.name, s.start_frac, s.end_frac = "one_minus_sqrt", 0.5, 0.02
        if c.size in ("17m", "32m", "68m", "400m"):  # the phase-3 decoders of these sizes kept local 10k
            c.model_overrides.decoder = dict(local_rope_theta=10_000.0)
        c.init_mode = "full"
    else:  # cross-objective: weights only, fresh optimizer, phase-3 data, RoPE 160k/160k
        c.total_tokens, c.mlm_rate = (50e9 if big else 16.7e9), 0.15
        s.name, s.final_frac = "warmup_stable_decay", 0.02
        s.warmup_tokens = 3e9 if big else 1e9
        s.decay_tokens = 10e9 if big else 3.3e9
        c.init_mode = "weights"


def apply_objective(c, objective: str):
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    c.objective = objective
    if objective == "mntp":
        c.cross_objective.encoder_objective = "mntp"


def ettin(size: str = "17m", objective: str = "mlm", phase: str = "pretrain") -> ml_collections.ConfigDict:
    c = base()
    apply_size(c, size)
    apply_objective(c, objective)
    apply_phase(c, phase)
    return c


def models_of(config) -> dict[str, str]:
    """{architecture: objective} trained by a config: 'encoder' and/or 'decoder'."""
    objective = config.objective
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    enc = config.cross_objective.encoder_objective if config.phase == "cross" else "mlm"
    if objective == "paired":
        return {"encoder": enc, "decoder": "clm"}
    if objective == "clm":
        return {"decoder": "clm"}
    return {"encoder": "mntp" if objective == "mntp" else enc}


def cross_source(arch: str) -> str:
    """Cross-objective training starts an architecture from the other one's weights."""
    return {"encoder": "decoder", "decoder": "encoder"}[arch]
