"""Token classification (the paper's token-level family, as NER / POS fine-tuning): a tag per subword token.

Examples are {text, spans: [[start, end, tag index], ...]} with character spans (data/eval/study/stdlib_tags_*:
the Python tokenizer's categories of stdlib code). A subword token takes the tag of the span holding its first
non-space character; tokens outside every span (whitespace, special tokens, padding) are not scored. The head is
classification's (dense -> GELU -> LayerNorm -> linear) on every position, trained with the same optimizer and
schedule. An encoder sees both sides of a token; a decoder only its left, which is what the task separates (whether
a name is called, say, is decided by the `(` to its right).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ettin_jax.evaluation.classification import (FinetuneConfig, head_logits, init_head, scaled_update, schedule_value,
                                                 unit_adamw)
from ettin_jax.evaluation.models import Model, hidden_states


def align(model: Model, example: dict, max_len: int) -> tuple[list[int], list[int]]:
    """(token ids with [CLS] / [SEP], a tag index per token or -1 where it is not scored), cut to max_len."""
    enc = model.tokenizer.encoding(example["text"])
    text = example["text"]
    starts = np.full(len(text) + 1, -1, np.int64)
    for a, b, tag in example["spans"]:
        starts[a:b] = tag
    ids, tags = list(enc.ids), []
    for a, b in enc.offsets:
        first = next((i for i in range(a, b) if not text[i].isspace()), None)
        tags.append(int(starts[first]) if first is not None else -1)
    if len(ids) > max_len:
        ids, tags = ids[:max_len - 1] + ids[-1:], tags[:max_len - 1] + [-1]
    return ids, tags


def _arrays(model: Model, rows: Sequence[dict], max_len: int):
    toks = np.full((len(rows), max_len), model.cfg.pad_token_id, np.int32)
    seg = np.zeros((len(rows), max_len), np.int32)
    tags = np.full((len(rows), max_len), -1, np.int32)
    for i, r in enumerate(rows):
        ids, t = align(model, r, max_len)
        toks[i, :len(ids)], seg[i, :len(ids)], tags[i, :len(t)] = ids, 1, t
    return toks, seg, tags


def _logits(params, cfg, mask, tokens, segment_ids):
    hidden = hidden_states(params["backbone"], cfg, mask, tokens, segment_ids)
    return head_logits(params["head"], hidden.astype(jnp.float32))


_forward = jax.jit(_logits, static_argnames=("cfg", "mask"))


@functools.partial(jax.jit, static_argnames=("cfg", "mask", "weight_decay"))
def _train_step(params, opt_state, lr, tokens, segment_ids, labels, *, cfg, mask, weight_decay):
    def loss_fn(p):
        logits = _logits(p, cfg, mask, tokens, segment_ids)
        scored = labels >= 0
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
        return (ce * scored).sum() / jnp.maximum(scored.sum(), 1)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    params, opt_state = scaled_update(unit_adamw(weight_decay), grads, opt_state, params, lr)
    return params, opt_state, loss


def fine_tune(model: Model, train: Sequence[dict], num_tags: int, lr: float, config: FinetuneConfig, log=print):
    """The fine-tuned parameters {backbone, head} after `config.epochs` over `train` at peak LR `lr`."""
    toks, seg, tags = _arrays(model, train, config.max_len)
    rng = np.random.default_rng(config.seed)
    steps = max(1, int(math.ceil(config.epochs * max(1, len(train) // config.batch_size))))
    params = dict(backbone=model.params, head=init_head(jax.random.key(config.seed), model.cfg.hidden_size, num_tags))
    opt_state = unit_adamw(config.weight_decay).init(params)
    order = np.array([], np.int64)
    for s in range(steps):
        if len(order) < config.batch_size:
            order = np.concatenate([order, rng.permutation(len(train))])
        idx, order = order[:config.batch_size], order[config.batch_size:]
        params, opt_state, loss = _train_step(params, opt_state, schedule_value(lr, steps, config.warmup_frac, s),
                                              toks[idx], seg[idx], tags[idx], cfg=model.cfg, mask=model.mask,
                                              weight_decay=config.weight_decay)
        if log and (s + 1) % max(1, steps // 4) == 0:
            log(f"  {model.name} tagging lr {lr:g} step {s + 1}/{steps} loss {float(loss):.4f}")
    return params


def item_accuracy(model: Model, params: dict, rows: Sequence[dict], max_len: int, batch_size: int = 32) -> np.ndarray:
    """Per example: the share of its scored tokens tagged right (the unit of the paired tests)."""
    toks, seg, tags = _arrays(model, rows, max_len)
    out = []
    for start in range(0, len(rows), batch_size):
        sl = slice(start, start + batch_size)
        t, s, g = toks[sl], seg[sl], tags[sl]
        n = len(t)
        if n < batch_size:  # one compiled shape
            t, s = np.concatenate([t, np.repeat(t[:1], batch_size - n, 0)]), np.concatenate(
                [s, np.repeat(s[:1], batch_size - n, 0)])
        pred = np.asarray(_forward(params, model.cfg, model.mask, t, s)).argmax(-1)[:n]
        scored = g >= 0
        out.append(((pred == g) & scored).sum(1) / np.maximum(scored.sum(1), 1))
    return np.concatenate(out)
