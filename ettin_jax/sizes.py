"""The Ettin model sizes: one table for each size's architecture, its recipe numbers and its reference counts.

Architecture from the reference table (section 1), per-size recipe numbers from the official YAMLs (section 3), plus
`tiny` for tests. Every size shares the ModernBERT defaults of `model.ModelConfig` (vocabulary 50368, head dim 64,
global attention every third layer, +-64 local windows); only depth and widths differ.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ettin_jax.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class Size:
    layers: int
    hidden: int
    inner: int  # GLU width (intermediate_size)
    heads: int
    peak_lr: float
    weight_decay: float
    lr_warmup_tokens: float
    batch_warmup_tokens: float  # phase 1's batch-size warmup
    # (backbone with the 50368 x H embedding, whole tied model) from the reference table; None for `tiny`
    reference_params: Optional[tuple[int, int]] = None


SIZES = {
    "17m": Size(7, 256, 384, 4, 3e-3, 3e-4, 4e9, 125e9, (16_797_440, 16_913_600)),
    "32m": Size(10, 384, 576, 6, 3e-3, 3e-4, 4e9, 100e9, (31_883_136, 32_081_344)),
    "68m": Size(19, 512, 768, 8, 3e-3, 3e-4, 3e9, 75e9, (68_144_640, 68_457_664)),
    "150m": Size(22, 768, 1152, 12, 8e-4, 1e-5, 3e9, 50e9, (149_014_272, 149_655_232)),
    "400m": Size(28, 1024, 2624, 16, 5e-4, 1e-5, 2e9, 10e9, (394_781_696, 395_881_664)),
    "1b": Size(28, 1792, 3840, 28, 5e-4, 5e-5, 2e9, 3e9, (1_028_050_688, 1_031_314_112)),
    "tiny": Size(4, 64, 128, 2, 3e-3, 3e-4, 1e6, 0.0),
}


def get(size: str) -> Size:
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {', '.join(SIZES)}")
    return SIZES[size]


def model_config(size: str, **overrides) -> ModelConfig:
    """The ModelConfig of a named size, with field overrides (e.g. vocab_size for a small tokenizer)."""
    s = get(size)
    fields = dict(num_layers=s.layers, hidden_size=s.hidden, intermediate_size=s.inner, num_heads=s.heads)
    fields.update(overrides)
    return ModelConfig(**fields)
