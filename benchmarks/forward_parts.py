"""Where the 150m encoder forward spends its time: the same jitted forward (8 x 512) with one part swapped out.

    JAX_PLATFORMS=cpu python benchmarks/forward_parts.py base|dense|tiled_all|tanh_gelu|no_rope|no_attention

base: as configured; dense: every layer dense (attention_impl=xla); tiled_all: every layer through the tiled
core over all keys (attention_impl=chunked); tanh_gelu: approximate GELU; no_rope: RoPE
skipped; no_attention: the attention op returns v. The parts are swapped by monkeypatching this process only: a
measurement, not a model. Figures: benchmarks/RESULTS.md, "Where our time goes".
"""
import sys, time, jax, jax.numpy as jnp
from ettin_jax import sizes, model, attention, kernels
from ettin_jax.model import Ettin
variant = sys.argv[1]
cfg = sizes.model_config("150m")
if variant == "dense":
    cfg = cfg.replace(attention_impl="xla")
if variant == "tiled_all":  # sliding-window layers through the tiled core over all keys (no blocks)
    cfg = cfg.replace(attention_impl="chunked")
if variant == "tanh_gelu":
    orig = jax.nn.gelu
    jax.nn.gelu = lambda x, approximate=False: orig(x, approximate=True)
if variant == "no_attention":
    kernels.self_attention = lambda q, k, v, **kw: v
if variant == "no_rope":
    model.apply_rope = lambda x, cos, sin: x
params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
toks = jnp.ones((8, 512), jnp.int32)
m = Ettin(cfg)
f = jax.jit(lambda p, t: m.apply({"params": p}, t, mask=attention.BIDIRECTIONAL))
f(params, toks).block_until_ready()
best = 1e9
for _ in range(3):
    t = time.perf_counter(); f(params, toks).block_until_ready(); best = min(best, time.perf_counter() - t)
proj = 8 * 512 * 22 * 2 * (4 * 768 * 768 + 3 * 768 * 1152)
print(f"{variant:14s} {best:6.2f} s   projections alone at 236 GFLOP/s would be {proj / 236e9:.2f} s")
