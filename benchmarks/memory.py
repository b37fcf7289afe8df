"""Per-chip memory of training each Ettin size, from abstract shapes (nothing is allocated or compiled).

    python benchmarks/memory.py                                  # the table in docs/scaling.md
    python benchmarks/memory.py --chips=64 --mesh=data=1,fsdp=-1,tensor=1 --tokens_per_chip=8192

For each size at 1024 and 8192 tokens of context it prints, per chip, in GiB:

    params        fp32 parameters (model.abstract_params), each leaf divided by the mesh axes its logical axes map
                  to under sharding.DEFAULT_RULES (an axis that does not divide the dimension replicates it, as
                  sharding.fit_shardings does)
    optimizer     the StableAdamW state from jax.eval_shape(tx.init, params): moments sharded like the parameters
                  (sharding.like_params), everything else replicated
    grads         one fp32 gradient per parameter, sharded like it
    gathered      the largest layer's weights all-gathered in the compute dtype (FSDP gathers a layer at a time;
                  counted twice for the next layer's prefetch)
    activations   an estimate (see `activation_bytes`) for `tokens_per_chip` tokens in flight on each chip
                  (the micro-batch: global batch / (data x fsdp x micro-batches), times seq_len)

The activation figure is an analytic estimate of what the backward pass keeps, not XLA's allocation: it assumes
a fused attention kernel (splash / cuDNN: no T x T scores are stored) and the chunked cross-entropy of
`objectives` (ce_chunk logits at a time). Treat it as +-30%; fragmentation and XLA temporaries come on top.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ettin_jax import optim, sharding, sizes  # noqa: E402
from ettin_jax.model import abstract_params  # noqa: E402

GiB = 2 ** 30
SIZES = ("17m", "32m", "68m", "150m", "400m", "1b")


def parse_mesh(text: str, chips: int) -> dict:
    cfg = dict(data=1, fsdp=1, sequence=1, tensor=1)
    for part in filter(None, text.split(",")):
        k, v = part.split("=")
        cfg[k.strip()] = int(v)
    return dict(zip(sharding.MESH_AXES, sharding.mesh_shape(cfg, chips)))


def _mesh_axes(logical, rules):
    table = {}
    for name, axes in rules:
        table.setdefault(name, axes)
    return [table.get(name) if name else None for name in logical]


def sharded_bytes(shape, dtype, logical, mesh: dict, rules=sharding.DEFAULT_RULES) -> float:
    """Bytes of one leaf on one chip."""
    n = math.prod(shape) * np.dtype(dtype).itemsize
    for dim, axes in zip(shape, _mesh_axes(tuple(logical or ()), rules)):
        if axes is None:
            continue
        k = math.prod(mesh[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
        if dim % k == 0:
            n /= k
    return n


def activation_bytes(cfg, tokens: int, remat: str, ce_chunk: int = 4096, act_bytes: int = 2) -> float:
    """What the backward pass keeps for `tokens` tokens on a chip (bf16 activations, fp32 LayerNorm statistics).

    Per layer and token, without remat: the LayerNorm outputs (2H), Wqkv's output (3H), RoPE'd q and k (2H), the
    attention output (H), Wo's output (H), the residual (H), Wi's output (2I), GELU and the gated product (2I),
    the MLP output (H): 11H + 4I values, plus two fp32 LayerNorm inputs (4H bf16-equivalents).
    remat=dots saves only the projections' outputs (3H + H + 2I + H) and the block input (H); remat=full only the
    block input, plus one block's full set while it is recomputed. The head and the chunked cross-entropy add
    3H per token and 2 x ce_chunk x V fp32 logits (values and gradient).
    """
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    full = (11 * h + 4 * i + 4 * h) * act_bytes
    per_layer = {"none": full, "dots": (6 * h + 2 * i) * act_bytes, "full": h * act_bytes}[remat]
    total = layers * per_layer * tokens
    if remat != "none":
        total += full * tokens  # the block being recomputed
    total += 3 * h * act_bytes * tokens + 2 * min(ce_chunk, tokens) * cfg.vocab_size * 4
    return total


def table(chips: int, mesh_text: str, tokens_per_chip: int, compute_bytes: int = 2) -> str:
    mesh = parse_mesh(mesh_text, chips)
    tx = optim.injectable_stable_adamw(max_learning_rate=1e-3, b1=0.9, b2=0.98, eps=1e-6, weight_decay=1e-5)
    rows = [f"Mesh {mesh} ({chips} chips), {tokens_per_chip} tokens per chip per micro-batch; GiB per chip.",
            "",
            "| size | params | context | rows/chip | params | optimizer | grads | gathered | state total "
            "| act. remat=none | act. dots | act. full | total none | total dots | total full |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in SIZES:
        cfg = sizes.model_config(name)
        shapes, specs = abstract_params(cfg)
        count = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
        flat_s = jax.tree_util.tree_leaves(shapes)
        flat_l = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        p = sum(sharded_bytes(x.shape, x.dtype, l, mesh) for x, l in zip(flat_s, flat_l))
        # Optimizer state: leaves shaped like a parameter are its moments (sharded like it); the rest replicate.
        opt = jax.eval_shape(tx.init, shapes)
        by_shape = {}
        for x, l in zip(flat_s, flat_l):
            by_shape.setdefault(tuple(x.shape), l)
        o = sum(sharded_bytes(x.shape, x.dtype, by_shape.get(tuple(x.shape)), mesh)
                for x in jax.tree_util.tree_leaves(opt))
        layer = max(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes[k]))
                    for k in shapes if k.startswith("layers_"))
        gathered = 2 * layer * compute_bytes / mesh["tensor"]
        state = p + o + p + gathered
        for ctx in (1024, 8192):
            tokens = max(ctx, tokens_per_chip) // mesh["sequence"]
            acts = [activation_bytes(cfg, tokens, r) for r in ("none", "dots", "full")]
            g = lambda x: f"{x / GiB:.2f}"
            rows.append(f"| {name} | {count / 1e6:.0f}M | {ctx} | {max(1, tokens_per_chip // ctx)} | {g(p)} | {g(o)} "
                        f"| {g(p)} | {g(gathered)} | {g(state)} | " + " | ".join(g(a) for a in acts) + " | "
                        + " | ".join(g(state + a) for a in acts) + " |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chips", type=int, default=64, help="chips in the mesh (v5p-128 = 64 chips)")
    ap.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1", help="axis sizes, one of them -1")
    ap.add_argument("--tokens_per_chip", type=int, default=8192,
                    help="tokens each chip processes per micro-batch (8 x 1024 or 1 x 8192)")
    args = ap.parse_args(argv)
    print(table(args.chips, args.mesh, args.tokens_per_chip))


if __name__ == "__main__":
    main()
