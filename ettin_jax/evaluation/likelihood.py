"""Scoring text by likelihood: log p(continuation | context) for decoders, masked pseudo-log-likelihood (PLL) for
encoders; zero-shot multiple choice on top of it (lm-evaluation-harness's `acc` and `acc_norm`).

Decoder: the sum over continuation tokens of log p(token | everything before it), one causal forward per
(context + continuation). Encoder (Salazar et al. 2020, "Masked Language Model Scoring"): each continuation token
is replaced by [MASK] in turn, with the context, the rest of the continuation and any right context visible, and
the log-probabilities of the true tokens are summed: one bidirectional forward per continuation token. An encoder
only scores text this way when asked (`pll=True`): its numbers are not comparable to a decoder's likelihood, and
silently scoring an encoder as if it were a decoder would be wrong.

Tokenization follows the harness: context and context + continuation are encoded, the continuation is the tail of
the latter (so BPE merges across the boundary are the model's), and trailing whitespace of the context moves to
the continuation. Sequences start with [CLS] (the decoders' BOS); over-long inputs lose tokens from the left.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ettin_jax.evaluation.models import Model, check_arch, hidden_states, pad
from ettin_jax.inference import predict_logits

BUCKETS = (64, 128, 256, 512)


def text_ids(model: Model, text: str) -> list[int]:
    """Ids of `text` without special tokens."""
    return model.tokenizer.ids(text)


def encode_pair(model: Model, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids starting with [CLS], continuation ids), split as lm-evaluation-harness splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = text_ids(model, context + continuation)
    ctx = text_ids(model, context)
    cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else text_ids(model, continuation)
    return [model.tokenizer.cls_id] + ctx, cont


def require_scorer(model: Model, pll: bool, task: str):
    if model.arch == "encoder" and not pll:
        raise ValueError(f"task {task!r} scores text by likelihood, which needs a decoder; {model.name} is an "
                         "encoder: pass --pll (pll=True) to score it by masked pseudo-log-likelihood instead")
    check_arch(model, ("encoder", "decoder"), task)


def _bucket(n: int, max_len: int) -> int:
    for b in BUCKETS:
        if n <= b <= max_len:
            return b
    return max_len


@functools.partial(jax.jit, static_argnames=("cfg", "mask"))
def _causal_scores(params, cfg, mask, tokens, segment_ids, target_mask):
    """Per row: sum of log p(tokens[t+1] | tokens[:t+1]) where target_mask[t+1], and whether all were argmax."""
    hidden = hidden_states(params, cfg, mask, tokens, segment_ids)
    logp = jax.nn.log_softmax(predict_logits(params, cfg, hidden[:, :-1]), axis=-1)
    targets = tokens[:, 1:]
    tl = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    m = target_mask[:, 1:]
    greedy = (logp.argmax(-1) == targets) | ~m
    return (tl * m).sum(1), greedy.all(1)


@functools.partial(jax.jit, static_argnames=("cfg", "mask"))
def _masked_scores(params, cfg, mask, tokens, segment_ids, position, target):
    """Per row: log p(target at `position`) and whether it is the argmax (the position holds [MASK])."""
    hidden = hidden_states(params, cfg, mask, tokens, segment_ids)
    h = jnp.take_along_axis(hidden, position[:, None, None], axis=1)[:, 0]
    logp = jax.nn.log_softmax(predict_logits(params, cfg, h), axis=-1)
    return jnp.take_along_axis(logp, target[:, None], axis=1)[:, 0], logp.argmax(-1) == target


def _run_rows(fn, model: Model, rows, max_len: int, batch_size: int, extra):
    """Runs `fn` over rows (token lists) grouped by padded length; `extra(i)` gives row i's other inputs."""
    out = [None] * len(rows)
    by_len = {}
    for i, r in enumerate(rows):
        by_len.setdefault(_bucket(len(r), max_len), []).append(i)
    for length, idx in sorted(by_len.items()):
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            full = chunk + [chunk[0]] * (batch_size - len(chunk))  # fixed batch: one compile per length
            toks, seg = pad([rows[i] for i in full], model.cfg.pad_token_id, length=length)
            args = [np.stack([extra(i)[k] for i in full]) for k in range(len(extra(chunk[0])))]
            a, b = jax.device_get(fn(model.params, model.cfg, model.mask, toks, seg, *args))
            for j, i in enumerate(chunk):
                out[i] = (float(a[j]), bool(b[j]))
    return out


def loglikelihoods(model: Model, requests: Sequence[tuple], *, pll: bool = False, max_len: int = 512,
                   batch_size: int = 16, task: str = "loglikelihood") -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each (context_ids, continuation_ids[, right_ids]) request.

    Decoders score continuation | context (right ids, if any, are scored too, as part of the sentence: the
    decoder's natural reading); encoders (pll=True) mask each continuation token in turn with the right context
    visible.
    """
    require_scorer(model, pll, task)
    if model.arch == "decoder":
        rows, masks = [], []
        for req in requests:
            ctx, cont = list(req[0]), list(req[1]) + (list(req[2]) if len(req) > 2 else [])
            if not cont:
                raise ValueError("an empty continuation has no likelihood to score")
            seq = (ctx + cont)[-max_len:]
            n_ctx = len(seq) - len(cont)
            rows.append(seq)
            masks.append(np.arange(len(seq)) >= n_ctx)

        def extra(i):
            length = _bucket(len(rows[i]), max_len)
            m = np.zeros(length, bool)
            m[:len(masks[i])] = masks[i]
            return (m,)
        return _run_rows(_causal_scores, model, rows, max_len, batch_size, extra)
    # Encoder PLL: one row per continuation token.
    rows, pos, tgt, owner = [], [], [], []
    for r, req in enumerate(requests):
        ctx, cont = list(req[0]), list(req[1])
        right = (list(req[2]) if len(req) > 2 else []) + [model.tokenizer.sep_id]
        if not cont:
            raise ValueError("an empty continuation has no likelihood to score")
        seq = ctx + cont + right
        cut = max(0, len(seq) - max_len)
        seq = seq[cut:]
        for j in range(len(cont)):
            p = len(ctx) - cut + j
            if p < 0:
                continue
            masked = list(seq)
            masked[p] = model.cfg.mask_token_id
            rows.append(masked)
            pos.append(p)
            tgt.append(seq[p])
            owner.append(r)
    scored = _run_rows(_masked_scores, model, rows, max_len, batch_size,
                       lambda i: (np.int32(pos[i]), np.int32(tgt[i])))
    totals = [[0.0, True] for _ in requests]
    for (lp, g), r in zip(scored, owner):
        totals[r][0] += lp
        totals[r][1] &= g
    return [tuple(t) for t in totals]


def multiple_choice(model: Model, items: Sequence[dict], *, pll: bool = False, task: str = "multiple_choice",
                    max_len: int = 512, per_item: bool = False) -> dict:
    """acc (argmax of summed log-likelihood) and acc_norm (per byte of the choice) over items
    {context, choices, label}; also the chance level (mean 1 / number of choices). `per_item`: also `correct`,
    each item's 0/1 by acc (for paired tests)."""
    require_scorer(model, pll, task)
    reqs, owner = [], []
    for i, it in enumerate(items):
        if not 0 <= int(it["label"]) < len(it["choices"]):
            raise ValueError(f"{task}: item {i} has label {it['label']} for {len(it['choices'])} choices")
        for c in it["choices"]:
            reqs.append(encode_pair(model, it["context"], c))
            owner.append(i)
    lls = loglikelihoods(model, reqs, pll=pll, max_len=max_len, task=task)
    correct, acc_norm, k = [], 0, 0
    for i, it in enumerate(items):
        scores = np.array([lls[k + j][0] for j in range(len(it["choices"]))])
        norm = scores / np.array([len(c.encode()) for c in it["choices"]])
        k += len(it["choices"])
        correct.append(int(np.argmax(scores) == int(it["label"])))
        acc_norm += int(np.argmax(norm) == int(it["label"]))
    n = len(items)
    out = dict(acc=sum(correct) / n, acc_norm=acc_norm / n,
               chance=float(np.mean([1 / len(it["choices"]) for it in items])))
    if per_item:
        out["correct"] = correct
    return out


def rolling_loglikelihood(model: Model, text: str, *, pll: bool = False, max_len: int = 512) -> float:
    """log p(text) over all its tokens (decoder: windows of max_len, each token scored once with as much left
    context as fits; encoder with pll: PLL within each window)."""
    require_scorer(model, pll, "loglikelihood_rolling")
    ids = text_ids(model, text)
    if not ids:
        return 0.0
    reqs = []
    window = max_len - 2
    for start in range(0, len(ids), window):
        cont = ids[start:start + window]
        left = ids[max(0, start - (max_len - len(cont))):start] if model.arch == "decoder" else []
        reqs.append(([model.tokenizer.cls_id] if start == 0 or not left else left, cont))
    return float(sum(ll for ll, _ in loglikelihoods(model, reqs, pll=pll, max_len=max_len)))
