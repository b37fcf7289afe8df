"""cuDNN flash attention on GPU through `jax.nn.dot_product_attention`."""
from __future__ import annotations

from typing import Optional

import jax

from ettin_jax.attention import Band


def cudnn_arguments(segment_ids, band: Band) -> Optional[dict]:
    """Keyword arguments of `jax.nn.dot_product_attention` that express (segment_ids, band), or None.

    cuDNN takes a causal mask, a left window (sliding_window_length, only together with the causal mask) and an
    explicit boolean mask; the segment ids become that mask ([B, 1, T, T]). A bidirectional bounded band (the
    encoder's local layers) has a right window cuDNN cannot take: None, and the caller uses `blocked_attention`.
    The same arguments mean the same thing to implementation='xla', which is how they are tested on CPU.
    """
    back, ahead = band
    args = dict(mask=segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    if ahead is None and back is None:
        return args
    if ahead == 0:
        args["is_causal"] = True
        if back is not None:
            args["local_window_size"] = (back, 0)
        return args
    return None


def cudnn_attention(q, k, v, *, segment_ids, band: Band, implementation: str = "cudnn"):
    """Attention through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU)."""
    args = cudnn_arguments(segment_ids, band)
    if args is None:
        raise ValueError(f"cuDNN cannot express the band {band} (a right window without the causal mask); "
                         "use blocked_attention")
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation, **args)
