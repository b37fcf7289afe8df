"""The models under evaluation: loading (workdirs and Hugging Face folders), batching, the jitted forward, pooling.

A `Model` is one architecture's parameters with its config, tokenizer and a display name; a paired workdir gives
two (`load_models`). Everything downstream calls `hidden_states` / `pool`, so the only place the architecture
enters is the attention mask chosen here from `arch` (encoder: bidirectional, decoder: causal).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ettin_jax import attention
from ettin_jax.inference import load_model
from ettin_jax.tokenizer import TextTokenizer
from ettin_jax.model import Ettin, ModelConfig

MASKS = {"encoder": attention.BIDIRECTIONAL, "decoder": attention.CAUSAL}
POOLINGS = {"encoder": ("mean", "cls"), "decoder": ("mean", "last")}


@dataclasses.dataclass
class Model:
    """One model to evaluate: params, config, 'encoder' or 'decoder', its tokenizer, and a name for tables."""

    name: str
    params: dict
    cfg: ModelConfig
    arch: str
    tokenizer: TextTokenizer
    path: str = ""

    @property
    def mask(self):
        return MASKS[self.arch]

    @property
    def num_params(self) -> int:
        return int(sum(x.size for x in jax.tree_util.tree_leaves(self.params)))


def _is_workdir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints"))


def load_models(path: str, which: Optional[str] = None, name: Optional[str] = None) -> list[Model]:
    """Every model at `path` (both of a paired workdir, unless `which`), named `name:arch` (name: the folder)."""
    from ettin_jax.checkpoint import load_models as workdir_models
    name = name or os.path.basename(os.path.normpath(path))
    archs = [which] if which else (sorted(workdir_models(path)) if _is_workdir(path) else [None])
    out = []
    for arch in archs:
        params, cfg, got, tok_dir = load_model(path, which=arch)
        if tok_dir is None:
            raise ValueError(f"{path!r} has no tokenizer (tokenizer.json): evaluation encodes text and needs one")
        out.append(Model(f"{name}:{got}", params, cfg, got, TextTokenizer(tok_dir), path))
    return out


def check_arch(model: Model, allowed: Sequence[str], task: str, hint: str = ""):
    if model.arch not in allowed:
        raise ValueError(f"task {task!r} needs a {' or '.join(allowed)}, but {model.name} is a {model.arch}"
                         + (f"; {hint}" if hint else ""))


def encode(model: Model, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """[CLS] text [SEP] ids, truncated to max_len (keeping [SEP] last), for both architectures: built here rather
    than by the folder's post-processor, which for an exported decoder adds no [SEP] (ettin_jax/tokenizer.py)."""
    tok = model.tokenizer
    out = []
    for t in texts:
        ids = [tok.cls_id] + tok.ids(t) + [tok.sep_id]
        if len(ids) > max_len:
            ids = ids[:max_len - 1] + ids[-1:]
        out.append(ids)
    return out


def pad(seqs: Sequence[Sequence[int]], pad_id: int, length: Optional[int] = None, multiple: int = 32):
    """Right-padded (tokens, segment_ids) int32 arrays; segment id 1 = token, 0 = padding."""
    longest = max(len(s) for s in seqs)
    if length is None:
        length = -(-longest // multiple) * multiple
    if longest > length:
        raise ValueError(f"a sequence of {longest} tokens does not fit the padded length {length}")
    tokens = np.full((len(seqs), length), pad_id, np.int32)
    seg = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
        seg[i, :len(s)] = 1
    return tokens, seg


def pool(hidden, segment_ids, how: str):
    """hidden [B, T, H] -> [B, H]: 'cls' (first token), 'last' (last real token) or 'mean' (over real tokens)."""
    m = (segment_ids > 0).astype(hidden.dtype)
    if how == "mean":
        return (hidden * m[..., None]).sum(1) / jnp.maximum(m.sum(1), 1)[:, None]
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        last = jnp.maximum(m.sum(1).astype(jnp.int32) - 1, 0)
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    raise ValueError(f"unknown pooling {how!r}; expected mean, cls or last")


def check_pooling(arch: str, how: str):
    if how not in POOLINGS[arch]:
        raise ValueError(f"pooling {how!r} does not suit a {arch}; expected one of {', '.join(POOLINGS[arch])}")


def hidden_states(params, cfg: ModelConfig, mask, tokens, segment_ids):
    """The backbone's final hidden states (traceable; callers jit)."""
    return Ettin(cfg).apply({"params": params}, tokens, mask=mask, segment_ids=segment_ids)


@functools.partial(jax.jit, static_argnames=("cfg", "mask", "how"))
def pooled(params, cfg, mask, how, tokens, segment_ids):
    return pool(hidden_states(params, cfg, mask, tokens, segment_ids), segment_ids, how)


def batches(n: int, size: int):
    for start in range(0, n, size):
        yield np.arange(start, min(n, start + size))
