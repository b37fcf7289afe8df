"""The Ettin model sizes (reference table, section 1) plus `tiny` for tests, as ModelConfig overrides.

Every size shares the ModernBERT defaults of `model.ModelConfig` (vocabulary 50368, head dim 64, global attention
every third layer, +-64 local windows); only depth and widths differ.
"""
from ettin_jax.model import ModelConfig

SIZES = {
    # name: (layers, hidden, GLU inner, heads)
    "tiny": (4, 64, 128, 2),
    "17m": (7, 256, 384, 4),
    "32m": (10, 384, 576, 6),
    "68m": (19, 512, 768, 8),
    "150m": (22, 768, 1152, 12),
    "400m": (28, 1024, 2624, 16),
    "1b": (28, 1792, 3840, 28),
}

# Parameter counts from the reference table: backbone (with the 50368 x H embedding) and the whole tied model.
REFERENCE_PARAM_COUNTS = {
    "17m": (16_797_440, 16_913_600),
    "32m": (31_883_136, 32_081_344),
    "68m": (68_144_640, 68_457_664),
    "150m": (149_014_272, 149_655_232),
    "400m": (394_781_696, 395_881_664),
    "1b": (1_028_050_688, 1_031_314_112),
}


def model_config(size: str, **overrides) -> ModelConfig:
    """The ModelConfig of a named size, with field overrides (e.g. vocab_size for a small tokenizer)."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {', '.join(SIZES)}")
    layers, hidden, inner, heads = SIZES[size]
    fields = dict(num_layers=layers, hidden_size=hidden, intermediate_size=inner, num_heads=heads)
    fields.update(overrides)
    return ModelConfig(**fields)
