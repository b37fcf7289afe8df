"""The FLOPs a step needs, and the peak they are measured against (MFU).

Counted per token of a packed row of length T (a multiply-add is 2 FLOPs; training is forward + backward = 3x
forward):

    projections   2 * (3H*H + H*H)                  Wqkv and Wo
    MLP           2 * (H*2I + I*H)                  Wi (input and gate) and Wo
    attention     2 * 2 * H * keys                  QK^T and PV; keys per query: global layers T (encoder) or
                                                    (T+1)/2 on average (decoder); local layers min(T, 2w+1)
                                                    (encoder) or the decoder window
    head          2 * (H*H + H*V) per *predicted* token (all tokens for CLM, masked ones for MLM/MNTP)

Only the FLOPs the model needs count: padding inside a window and recomputation (remat) do not.
"""
from __future__ import annotations

import functools
import time

from ettin_jax.model import LOCAL, ModelConfig

# Dense bf16 peak FLOP/s per chip.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool) -> float:
    """Backbone forward FLOPs per token (no head)."""
    h, i, t = cfg.hidden_size, cfg.intermediate_size, seq_len
    total = 0.0
    for kind in cfg.layer_types:
        if kind == LOCAL:
            if causal:
                keys = min(t, cfg.decoder_window or cfg.local_window)
            else:
                keys = min(t, 2 * cfg.local_window + 1)
        else:
            keys = (t + 1) / 2 if causal else t
        total += 2 * 4 * h * h + 2 * 3 * h * i + 4 * h * keys
    return total


def head_flops(cfg: ModelConfig) -> float:
    return 2 * (cfg.hidden_size * cfg.hidden_size + cfg.hidden_size * cfg.vocab_size)


def train_flops(cfg: ModelConfig, *, tokens: float, predictions: float, seq_len: int, causal: bool) -> float:
    """FLOPs of one training step (forward + backward) over `tokens` tokens with `predictions` predictions."""
    return 3 * (tokens * forward_flops_per_token(cfg, seq_len, causal=causal) + predictions * head_flops(cfg))


MEASURE_REPEATS = 10  # timed matmuls per measurement of a CPU's peak; the best one counts


def _measure_matmul_peak(n: int, repeats: int, dtype: str) -> float:
    import jax
    import jax.numpy as jnp
    a = jnp.ones((n, n), jnp.dtype(dtype))
    f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(n: int = 2048, repeats: int = MEASURE_REPEATS, dtype: str = "float32") -> float:
    """Matmul FLOP/s of this machine's default device (the CPU's peak for MFU): fp32, or for dtype="bfloat16" bf16
    operands with fp32 accumulation (the products a bf16 model runs; on CPU YNNPACK's AMX/AVX512-BF16 kernels).
    The best of `repeats` timed products: other work on the machine only ever makes one slower."""
    return _measure_matmul_peak(n, repeats, dtype)


def _cpu_dtype(dtype: str) -> str:
    import jax.numpy as jnp
    return "bfloat16" if jnp.dtype(dtype) == jnp.bfloat16 else "float32"


def peak_flops_per_device(dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for the first device, for a model computing in `dtype`."""
    import jax
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", "")
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak, f"{kind} bf16 dense table value"
    if d.platform == "cpu":
        low = _cpu_dtype(dtype) == "bfloat16"
        return (measured_matmul_peak(dtype=_cpu_dtype(dtype)),
                f"measured {'bf16' if low else 'fp32'} matmul peak of this CPU, best of {MEASURE_REPEATS}")
    return float("nan"), f"unknown device kind {kind!r}"


class Peak:
    """The denominator of MFU: the peak FLOP/s of `n_devices` devices like the first, for a model in `dtype`.

    A known accelerator's comes from the table; a CPU's is measured (`peak_flops_per_device`). A measurement taken
    while the machine is busy comes out low, and MFU against it can exceed 100% (157-167% were logged on a loaded
    host). So when an observed rate exceeds the peak, the peak is measured again, and if the rate still exceeds
    it, the peak is raised to the observed rate: `mfu` never exceeds 1. `source` says where the figure comes from;
    `log` is told at the start and whenever it changes.
    """

    def __init__(self, dtype: str = "float32", n_devices: int = 1, log=None):
        self.dtype, self.n_devices, self.log = dtype, n_devices, log or (lambda message: None)
        self.per_device, self.source = peak_flops_per_device(dtype)
        self.log(f"MFU against {self.per_device / 1e9:,.0f} GFLOP/s per device ({self.source})")

    def mfu(self, flops_per_s: float) -> float:
        """Model FLOP utilisation of an observed rate (FLOP/s over all devices), at most 1."""
        per_device = flops_per_s / self.n_devices
        if per_device > self.per_device:  # False for a NaN peak (unknown device): MFU stays NaN
            before = self.per_device
            if self.source.startswith("measured"):
                again = _measure_matmul_peak(2048, MEASURE_REPEATS, _cpu_dtype(self.dtype))
                if again > self.per_device:
                    self.per_device = again
                    self.source = self.source.split(";")[0] + "; measured again when a step ran faster"
            if per_device > self.per_device:
                self.per_device = per_device
                self.source = self.source.split(";")[0] + "; raised to the fastest observed rate"
            self.log(f"MFU peak {before / 1e9:,.0f} -> {self.per_device / 1e9:,.0f} GFLOP/s per device: an observed "
                     f"{per_device / 1e9:,.0f} GFLOP/s exceeded it ({self.source})")
        return per_device / self.per_device
