"""The Ettin model: ModernBERT in Flax, one parameter pytree for encoder and decoder.

    tokens -> tok_embeddings -> LayerNorm -> [Block x L] -> final LayerNorm -> hidden      (`Ettin.__call__`)
    Block:  x = x + Wo(attention(RoPE(Wqkv(LN(x)))))   (no LN before attention in layer 0)
            x = x + Wo(GELU(Wi_in(LN(x))) * Wi_gate(LN(x)))
    hidden -> dense -> GELU -> LayerNorm -> tok_embeddings^T + bias -> logits               (`Ettin.predict`)

Whether the stack is an encoder or a decoder is decided by the `mask` argument (`attention.BIDIRECTIONAL` or
`attention.CAUSAL`) and nothing else. Layer i is global iff i % 3 == 0; the others attend within a sliding window
and use their own RoPE theta. Packed rows carry `segment_ids` (1.. per document, 0 = padding) and per-document
`positions`: the segment ids reach the attention mask, the positions reach RoPE.

Parameters are a plain nested dict (`model.init(...)['params']`, unboxed), named after the Hugging Face modules
so that `ettin_jax.hf` is a table of renames and transposes. Parameters and activations carry logical axis names
(parameters: `vocab`, `embed`, `qkv`, `heads`, `mlp`; activations: `act_batch`, `act_length`, `act_embed`,
`act_heads`, `act_mlp`) that `ettin_jax.sharding` maps onto mesh axes.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ettin_jax import attention as attn_lib
from ettin_jax import kernels

Array = jax.Array

GLOBAL, LOCAL = "full_attention", "sliding_attention"  # Hugging Face's layer type names


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters (the fields of a ModernBERT config.json, under our names)."""

    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_layers: int = 22
    num_heads: int = 12
    global_every: int = 3
    layer_types: tuple[str, ...] = ()  # empty: derived from global_every (layer i global iff i % n == 0)
    local_window: int = 64  # encoder local layers see keys within +-64 (HF local_attention = 128)
    decoder_window: Optional[int] = None  # keys a causal local layer sees; None: HF ModernBertDecoder (64)
    global_rope_theta: float = 10_000.0
    local_rope_theta: float = 10_000.0
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    init_std: float = 0.02
    attention_dropout: float = 0.0  # dropout after attention's Wo (Ettin pretraining: 0.1)
    dtype: str = "float32"  # compute dtype; parameters stay float32
    param_dtype: str = "float32"
    attention_impl: str = "auto"  # auto | xla | blocked | chunked | cudnn | splash (kernels.self_attention)
    attention_block: int = 64
    remat: str = "none"  # none | full | dots (jax.checkpoint policy per block)
    pad_token_id: int = 50283
    cls_token_id: int = 50281
    sep_token_id: int = 50282
    mask_token_id: int = 50284
    unk_token_id: int = 50280

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        types = self.layer_types or tuple(
            GLOBAL if i % self.global_every == 0 else LOCAL for i in range(self.num_layers))
        if len(types) != self.num_layers or set(types) - {GLOBAL, LOCAL}:
            raise ValueError(
                f"layer_types must be {self.num_layers} entries of {GLOBAL!r}/{LOCAL!r}, got {types}")
        object.__setattr__(self, "layer_types", tuple(types))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def band(self, mask: attn_lib.Mask, layer: int) -> attn_lib.Band:
        return mask.band(local=self.layer_types[layer] == LOCAL, local_window=self.local_window,
                         decoder_window=self.decoder_window)

    def replace(self, **kw) -> "ModelConfig":
        if "layer_types" not in kw and ("num_layers" in kw or "global_every" in kw):
            kw["layer_types"] = ()
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d) -> "ModelConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}")
        if "layer_types" in d:
            d["layer_types"] = tuple(d["layer_types"] or ())
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _init(std: float, names: tuple):
    return nn.with_logical_partitioning(jax.nn.initializers.truncated_normal(std), names)


def rope_tables(positions: Array, head_dim: int, theta: float):
    """cos, sin [B, T, head_dim] for the rotate-half (NeoX) layout, in fp32 (computed once per forward pass)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return kernels.materialize(jnp.cos(emb)), kernels.materialize(jnp.sin(emb))


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, H, D]; rotate-half RoPE computed in fp32."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def _layer_norm(x: Array, scale: Array, eps: float, dtype):
    native = kernels.layer_norm_forward(x, scale, eps, dtype)
    if native is not None:
        return native
    xf = x.astype(jnp.float32)
    mean = kernels.row_mean(xf)
    rstd = jax.lax.rsqrt(kernels.row_mean(jnp.square(xf - mean)) + eps)
    return ((xf - mean) * rstd * scale).astype(dtype), mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def layer_norm(x: Array, scale: Array, eps: float, dtype) -> Array:
    """Scale-only LayerNorm over the last axis, statistics in fp32, output in `dtype`.

    The custom VJP keeps only the input (which the residual stream keeps anyway) and the per-row mean and 1/std, and
    recomputes the normalised rows in the backward pass. Under autodiff XLA keeps the centred rows, the normalised
    rows and (on CPU) 1/std broadcast to [tokens, hidden] as well: three more [tokens, hidden] arrays per norm.
    """
    return _layer_norm(x, scale, eps, dtype)[0]


def _layer_norm_fwd(x, scale, eps, dtype):
    y, mean, rstd = _layer_norm(x, scale, eps, dtype)
    return y, (x, mean, rstd, scale)


def _layer_norm_bwd(eps, dtype, res, dy):
    # Every [tokens, H] term below is a function of dy: a term of x alone (the normalised rows) would be scheduled
    # into the forward pass by XLA and kept, which is what this VJP avoids. Per row, with g = dy * scale:
    #   dx = rstd * (g - mean(g)) - (x - mean) * rstd^2 * c,   c = mean(g * xhat) = rstd * (mean(g x) - mean mean(g)).
    x, mean, rstd, scale = res
    xf, dy = x.astype(jnp.float32), dy.astype(jnp.float32)
    g = dy * scale
    mg = kernels.row_mean(g)
    c = rstd * (kernels.row_mean(g * xf) - mean * mg)
    dx = rstd * (g - mg) - (xf - mean) * (rstd * rstd * c)
    dscale = kernels.weighted_row_sum(dy * (xf - mean), rstd)
    return dx.astype(x.dtype), dscale.astype(scale.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@jax.custom_vjp
def geglu(h: Array) -> Array:
    """GELU(h[..., :I]) * h[..., I:] (exact, erf GELU), with a backward pass that keeps only `h`.

    Autodiff keeps GELU's erf and product intermediates as well (two more [tokens, I] arrays per layer); here the
    backward pass recomputes GELU and its derivative from `h`, elementwise, in fp32.
    """
    inp, gate = jnp.split(h, 2, axis=-1)
    return jax.nn.gelu(inp, approximate=False) * gate


def _geglu_fwd(h):
    return geglu.fun(h), h


def _geglu_bwd(h, dy):
    # GELU(a) = a * Phi(a), GELU'(a) = Phi(a) + a * phi(a), recomputed from h (tied to dy: `kernels.tie`).
    inp, gate = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    dy = dy.astype(jnp.float32)
    inp = kernels.tie(inp, dy)
    cdf = 0.5 * (1.0 + jax.lax.erf(inp * (1.0 / math.sqrt(2.0))))
    pdf = jnp.exp(-0.5 * jnp.square(inp)) * (1.0 / math.sqrt(2.0 * math.pi))
    d_inp = dy * gate * (cdf + inp * pdf)
    d_gate = dy * inp * cdf
    return (jnp.concatenate([d_inp, d_gate], axis=-1).astype(h.dtype),)


geglu.defvjp(_geglu_fwd, _geglu_bwd)


class LayerNorm(nn.Module):
    """Scale-only LayerNorm (no bias), statistics in fp32."""

    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), jnp.float32)
        return layer_norm(x, scale, self.eps, jnp.dtype(self.dtype))


class Dense(nn.Module):
    """Bias-free projection whose kernel is [in, out] with logical axis names.

    Given `kernel_t` ([out, in], the kernel transposed) in place of `kernel`, it contracts that instead: decoding on
    CPU passes some kernels so (`transpose_for_decoding`).
    """

    features: int
    std: float
    names: tuple
    dtype: Any

    @nn.compact
    def __call__(self, x):
        if self.has_variable("params", "kernel_t"):
            kernel_t = self.get_variable("params", "kernel_t")
            if kernel_t.shape != (self.features, x.shape[-1]):
                raise ValueError(f"{self.name}: kernel_t has shape {kernel_t.shape}; expected "
                                 f"{(self.features, x.shape[-1])} ([out, in])")
            return jax.lax.dot_general(x.astype(self.dtype), kernel_t.astype(self.dtype),
                                       (((x.ndim - 1,), (1,)), ((), ())))
        kernel = self.param("kernel", _init(self.std, self.names), (x.shape[-1], self.features), jnp.float32)
        return kernels.dense(x.astype(self.dtype), kernel)


def transpose_for_decoding(params: dict) -> dict:
    """`params` with the output projections' kernels (attention and MLP `Wo`) stored transposed, as `kernel_t`.

    Batch-1 decoding is matrix-vector products that stream every weight once per token. XLA:CPU streams an [out, in]
    matrix into a short output faster than an [in, out] one: the 150m's `Wo` products 5.3 -> 4.4 ms per token (the
    wider Wqkv and Wi products gain nothing, so they stay, and the copy costs a fifth of the weights' memory).
    `inference.generate` uses it on CPU only.
    """
    def flip(tree, name=None):
        if isinstance(tree, dict):
            if name == "Wo" and set(tree) == {"kernel"}:
                return {"kernel_t": tree["kernel"].T}
            return {k: flip(v, k) for k, v in tree.items()}
        return tree

    return flip(params)


def split_and_rotate(qkv: Array, cos: Array, sin: Array):
    """The fused projection's output [B, T, 3, H, D] -> q, k, v [B, T, H, D], RoPE applied to q and k."""
    q, k, v = (qkv[:, :, i] for i in range(3))
    q = nn.with_logical_constraint(apply_rope(q, cos, sin), ("act_batch", "act_length", "act_heads", None))
    k = nn.with_logical_constraint(apply_rope(k, cos, sin), ("act_batch", "act_length", "act_heads", None))
    return q, k, v


class Attention(nn.Module):
    config: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, band, deterministic, cache=None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        b, t, _ = x.shape
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        qkv = Dense(3 * cfg.hidden_size, cfg.init_std, ("embed", "qkv"), dtype, name="Wqkv")(x)
        qkv = qkv.reshape(b, t, 3, cfg.num_heads, cfg.head_dim)
        if cache is None:
            o = kernels.attention(qkv, cos, sin, segment_ids, band, impl=cfg.attention_impl,
                                  block=cfg.attention_block, rotate=split_and_rotate)
            new_cache = None
        else:  # incremental decoding: write this step's keys/values into the cache, attend over it
            q, k, v = split_and_rotate(qkv, cos, sin)
            o, new_cache = _cached_attention(q, k, v, segment_ids, cache, band, dtype)
        o = Dense(cfg.hidden_size, out_std, ("heads", "embed"), dtype, name="Wo")(o.reshape(b, t, -1))
        o = nn.Dropout(cfg.attention_dropout)(o, deterministic=deterministic)
        return o, new_cache


def _cached_attention(q, k, v, segment_ids, cache, band, dtype):
    """Attention of t new tokens over a layer's KV cache (`init_cache`), and the cache with them written.

    A layer's cache is a ring of S slots, position p in slot p % S. A global layer's S is the cache's max_len, so no
    slot is reused; a sliding-window layer's is its window, so it keeps and reads only the keys it can see: O(window)
    per decoded token instead of O(tokens so far), and (for the 150m) 64 slots instead of max_len.
    """
    b, t = segment_ids.shape
    index, slots = cache["index"], cache["k"].shape[1]
    heads_major = lambda x: jnp.swapaxes(x, 1, 2).reshape(cache["k"].shape[0], t, -1).astype(cache["k"].dtype)
    old = (cache["k"], cache["v"], cache["segment_ids"])
    new = (heads_major(k), heads_major(v), segment_ids)
    held = lambda last: last - (last - jnp.arange(slots)) % slots  # each slot's position once `last` is written
    q_idx = jnp.broadcast_to(index + jnp.arange(t), (b, t))
    if t == 1 or band[0] is None:  # no wrap within the step: written in place and read where it lies
        written = tuple(jax.lax.dynamic_update_slice_in_dim(c, n, index % slots, axis=1) for c, n in zip(old, new))
        keys, values, k_seg = written
        k_idx = held(index + t - 1)
    else:  # several tokens into a window's ring: attend over its slots and the new tokens, then keep the latest
        keys, values, k_seg = (jnp.concatenate([c, n], axis=1) for c, n in zip(old, new))
        k_idx = jnp.concatenate([held(index - 1), index + jnp.arange(t)])
        position = held(index + t - 1)
        fresh, offset = position >= index, jnp.clip(position - index, 0, t - 1)
        written = tuple(jnp.where(fresh[:, None] if c.ndim == 3 else fresh,
                                  jnp.take(n, offset, axis=1), c) for c, n in zip(old, new))
    o = attn_lib.cached_attention(q, keys.astype(dtype), values.astype(dtype), q_seg=segment_ids, k_seg=k_seg,
                                  band=band, q_idx=q_idx, k_idx=jnp.broadcast_to(k_idx, (b, k_idx.shape[0])))
    return o, dict(k=written[0], v=written[1], segment_ids=written[2], index=index)


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        h = Dense(2 * cfg.intermediate_size, cfg.init_std, ("embed", "mlp"), dtype, name="Wi")(x)
        h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_mlp"))
        h = geglu(h)
        return Dense(cfg.hidden_size, cfg.init_std / math.sqrt(2 * cfg.num_layers), ("mlp", "embed"), dtype,
                     name="Wo")(h)


class Block(nn.Module):
    """Pre-norm transformer block; layer 0 has no attention LayerNorm (the embedding norm precedes it)."""

    config: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, band, deterministic, cache=None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        h = x if self.layer == 0 else LayerNorm(cfg.norm_eps, dtype, name="attn_norm")(x)
        a, new_cache = Attention(cfg, self.layer, name="attn")(h, cos, sin, segment_ids, band, deterministic, cache)
        x = x + a
        x = x + MLP(cfg, name="mlp")(LayerNorm(cfg.norm_eps, dtype, name="mlp_norm")(x))
        return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed")), new_cache


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Ettin(nn.Module):
    """ModernBERT backbone + prediction head. `mask` selects encoder or decoder."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        self.tok_embeddings = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32,
            embedding_init=_init(cfg.init_std, ("vocab", "embed")), name="tok_embeddings")
        self.embed_norm = LayerNorm(cfg.norm_eps, dtype, name="embed_norm")
        block = Block
        if cfg.remat != "none":
            if cfg.remat not in _REMAT_POLICIES:
                raise ValueError(f"unknown remat policy {cfg.remat!r}; expected none, {', '.join(_REMAT_POLICIES)}")
            # static: band and deterministic (flax counts the module as argument 0)
            block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], static_argnums=(5, 6))
        self.layers = [block(cfg, i, name=f"layers_{i}") for i in range(cfg.num_layers)]
        self.final_norm = LayerNorm(cfg.norm_eps, dtype, name="final_norm")
        self.head_dense = Dense(cfg.hidden_size, cfg.init_std / math.sqrt(2 * cfg.num_layers), ("embed", "embed_out"),
                                dtype, name="head_dense")
        self.head_norm = LayerNorm(cfg.norm_eps, dtype, name="head_norm")
        self.decoder_bias = self.param(
            "decoder_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,),
            jnp.float32)

    def __call__(self, tokens, *, mask, segment_ids=None, positions=None, deterministic=True, cache=None):
        """Backbone: tokens [B, T] -> final-normed hidden states [B, T, H].

        mask: `attention.BIDIRECTIONAL` (encoder) or `attention.CAUSAL` (decoder), or their names.
        segment_ids: [B, T], 1.. per packed document, 0 = padding (default: all 1).
        positions: [B, T] RoPE positions, restarting per document (default: 0..T-1, or from the cache index).
        cache: for incremental decoding, the dict from `init_cache`; then returns (hidden, new_cache).
        """
        cfg = self.config
        mask = attn_lib.get_mask(mask)
        if cache is not None and not mask.causal:
            raise ValueError(f"a KV cache is for causal decoding; got mask={mask.name!r} (use attention.CAUSAL)")
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            start = 0 if cache is None else cache["index"]
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.embed_norm(self.tok_embeddings(tokens))
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        tables = {GLOBAL: rope_tables(positions, cfg.head_dim, cfg.global_rope_theta),
                  LOCAL: rope_tables(positions, cfg.head_dim, cfg.local_rope_theta)}
        new_layers = []
        for i, layer in enumerate(self.layers):
            cos, sin = tables[cfg.layer_types[i]]
            layer_cache = None if cache is None else dict(cache["layers"][i], index=cache["index"])
            x, c = layer(x, cos, sin, segment_ids, cfg.band(mask, i), deterministic, layer_cache)
            if c is not None:
                c.pop("index")
                new_layers.append(c)
        x = self.final_norm(x)
        if cache is None:
            return x
        return x, dict(layers=new_layers, index=cache["index"] + t)

    def head(self, hidden):
        """The prediction head before the decoder: dense -> GELU -> LayerNorm."""
        return self.head_norm(jax.nn.gelu(self.head_dense(hidden), approximate=False))

    def decode(self, features):
        """Tied decoder: features @ tok_embeddings^T + bias, logits in fp32."""
        features = features.astype(self.tok_embeddings.dtype)
        return kernels.tied_logits(features, self.tok_embeddings.embedding) + self.decoder_bias

    def predict(self, hidden):
        """hidden [..., H] -> logits [..., V] (fp32)."""
        return self.decode(self.head(hidden))

    def init_all(self, tokens):
        """Touches every parameter (used by `init_params`)."""
        return self.predict(self(tokens, mask=attn_lib.BIDIRECTIONAL))


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """An empty KV cache for decoding up to `max_len` tokens (segment id -1 marks slots not written yet).

    Each layer holds keys and values [batch * heads, slots, head_dim] (`attention.cached_attention` says why this
    layout): a global layer max_len slots, a sliding-window layer only as many as its window sees (a ring, see
    `_cached_attention`).
    """
    def layer(i):
        back = config.band(attn_lib.CAUSAL, i)[0]
        slots = max_len if back is None else min(max_len, back + 1)
        shape = (batch * config.num_heads, slots, config.head_dim)
        return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                    segment_ids=jnp.full((batch, slots), -1, jnp.int32))

    return dict(layers=[layer(i) for i in range(config.num_layers)], index=jnp.zeros((), jnp.int32))


def _unbox(boxed):
    """Strips the logical-axis boxes (without applying constraints: shardings are given explicitly by the caller)."""
    return jax.tree_util.tree_map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x, boxed,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _for_init(config: ModelConfig) -> ModelConfig:
    """The config that initialisation runs: parameters do not depend on the attention implementation, and the
    (1, 8) dummy batch fits no tiled kernel (splash needs rows of 128), so init attends densely."""
    return config.replace(attention_impl="xla")


def init_params(config: ModelConfig, rng) -> dict:
    """Fresh parameters: a plain nested dict of float32 arrays."""
    boxed = Ettin(_for_init(config)).init(rng, jnp.zeros((1, 8), jnp.int32), method=Ettin.init_all)
    return _unbox(boxed)["params"]


def abstract_params(config: ModelConfig):
    """(ShapeDtypeStruct tree, logical PartitionSpec tree) without allocating anything."""
    boxed = jax.eval_shape(
        functools.partial(Ettin(_for_init(config)).init, method=Ettin.init_all), jax.random.key(0),
        jnp.zeros((1, 8), jnp.int32))
    return _unbox(boxed)["params"], nn.get_partition_spec(boxed)["params"]


def count_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
