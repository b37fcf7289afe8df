"""Sequence classification fine-tuning, GLUE style (reference section 5).

A head on a pooled output (encoders: mean or [CLS]; decoders: mean or the last token), ModernBERT's classifier
head (dense -> GELU -> LayerNorm -> linear), the whole model fine-tuned with decoupled AdamW (betas 0.9 / 0.98,
eps 1e-6, weight decay on matrices only), 6% linear warmup then linear decay to 0, as Ettin's GLUE runs. The
learning rate is picked from a grid on a dev split carved from the training set (the reference's grid spans
1e-5..3e-4); the chosen model is retrained on nothing more (the dev split stays held out) and scored on test.

Everything is one jitted step on fixed shapes (batch x max_len), so a few hundred steps of a demo-size model take
a minute or two on CPU.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ettin_jax.evaluation import metrics
from ettin_jax.evaluation.models import Model, check_pooling, encode, hidden_states, pad, pool


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    lrs: tuple = (3e-4,)  # grid; >1 value: chosen on the dev split
    epochs: float = 8.0
    batch_size: int = 32
    max_len: int = 128
    weight_decay: float = 1e-2
    warmup_frac: float = 0.06
    dev_frac: float = 0.1
    pooling: Optional[str] = None  # None: mean
    seed: int = 0


@dataclasses.dataclass
class Classifier:
    """A fine-tuned model and its head; `labels[i]` is the name of logit i."""

    model: Model
    params: dict
    labels: tuple
    pooling: str
    max_len: int

    def logits(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            toks, seg = pad(encode(self.model, chunk, self.max_len), self.model.cfg.pad_token_id,
                            length=self.max_len)
            n = len(chunk)
            if n < batch_size:  # one compiled shape: pad the batch with copies of the first row
                toks = np.concatenate([toks, np.repeat(toks[:1], batch_size - n, 0)])
                seg = np.concatenate([seg, np.repeat(seg[:1], batch_size - n, 0)])
            out.append(np.asarray(_forward(self.params, self.model.cfg, self.model.mask, self.pooling, toks, seg))[:n])
        return np.concatenate(out)

    def predict(self, texts: Sequence[str]) -> list:
        return [self.labels[i] for i in self.logits(texts).argmax(-1)]


def init_head(rng, hidden: int, num_labels: int) -> dict:
    k1, k2 = jax.random.split(rng)
    init = jax.nn.initializers.truncated_normal(0.02)
    return dict(dense=init(k1, (hidden, hidden)), norm=jnp.ones((hidden,)), out=init(k2, (hidden, num_labels)),
                bias=jnp.zeros((num_labels,)))


def head_logits(head: dict, x):
    h = jax.nn.gelu(x @ head["dense"], approximate=False)
    mu = h.mean(-1, keepdims=True)
    h = (h - mu) * jax.lax.rsqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * head["norm"]
    return h @ head["out"] + head["bias"]


def _logits(params, cfg, mask, how, tokens, segment_ids):
    hidden = hidden_states(params["backbone"], cfg, mask, tokens, segment_ids)
    return head_logits(params["head"], pool(hidden, segment_ids, how).astype(jnp.float32))


_forward = jax.jit(_logits, static_argnames=("cfg", "mask", "how"))


def _adamw(learning_rate, weight_decay: float):
    decay_mask = lambda p: jax.tree_util.tree_map(lambda x: x.ndim > 1, p)
    return optax.adamw(learning_rate, b1=0.9, b2=0.98, eps=1e-6, weight_decay=weight_decay, mask=decay_mask)


def make_optimizer(lr: float, steps: int, warmup_frac: float, weight_decay: float):
    """Decoupled AdamW (0.9, 0.98, 1e-6), warmup `warmup_frac` of the steps then linear decay to 0."""
    warm = max(1, int(round(warmup_frac * steps)))
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warm), optax.linear_schedule(lr, 0.0, max(1, steps - warm))], [warm])
    return _adamw(schedule, weight_decay)


def schedule_value(lr: float, steps: int, warmup_frac: float, count: int) -> np.float32:
    """`make_optimizer`'s learning rate at update `count` (0-based), computed on the host."""
    warm = max(1, int(round(warmup_frac * steps)))
    if count < warm:
        return np.float32(lr * count / warm)
    return np.float32(lr * max(0.0, 1.0 - (count - warm) / max(1, steps - warm)))


def unit_adamw(weight_decay: float):
    """`make_optimizer` at learning rate 1; `scaled_update` applies each step's rate. The rate is then a traced
    argument, so one compiled train step serves every grid point, seed and run length (a schedule inside the
    optimizer would be compiled into the step, once per fine-tuning run)."""
    return _adamw(1.0, weight_decay)


def scaled_update(tx, grads, opt_state, params, lr):
    """`tx.update` and apply, its updates scaled by `lr`: equal to `make_optimizer` at the same rate, because
    optax's adamw multiplies its whole update (weight decay included) by the rate last."""
    updates, opt_state = tx.update(grads, opt_state, params)
    updates = jax.tree_util.tree_map(lambda u: (lr * u).astype(u.dtype), updates)
    return optax.apply_updates(params, updates), opt_state


def label_ids(labels: Sequence, head_labels: Sequence, what: str) -> np.ndarray:
    """Each label's logit index. The data's label set must be the head's, both ways: a label the head lacks
    cannot be predicted, and a head label the data never shows is a different task (or a mislabelled split)."""
    index = {l: i for i, l in enumerate(head_labels)}
    for i, l in enumerate(labels):
        if l not in index:
            raise ValueError(f"{what}: label {l!r} (example {i}) does not match the head, whose labels are "
                             f"{list(head_labels)}")
    seen = set(labels)
    missing = [l for l in head_labels if l not in seen]
    if missing:
        raise ValueError(f"{what}: the head's labels are {list(head_labels)}, but the data's label set is "
                         f"{sorted(seen, key=index.get)}: no example of {missing}; expected every head "
                         "label in the data (or a head with exactly the data's labels)")
    return np.asarray([index[l] for l in labels], np.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "mask", "how", "weight_decay"))
def _train_step(params, opt_state, lr, tokens, segment_ids, labels, *, cfg, mask, how, weight_decay):
    def loss_fn(p):
        logits = _logits(p, cfg, mask, how, tokens, segment_ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    params, opt_state = scaled_update(unit_adamw(weight_decay), grads, opt_state, params, lr)
    return params, opt_state, loss


def _train(model: Model, texts, y, num_labels: int, pooling: str, lr: float, cfg: FinetuneConfig, log) -> dict:
    rng = np.random.default_rng(cfg.seed)
    n = len(texts)
    per_epoch = max(1, n // cfg.batch_size)
    steps = max(1, int(math.ceil(cfg.epochs * per_epoch)))
    params = dict(backbone=model.params,
                  head=init_head(jax.random.key(cfg.seed), model.cfg.hidden_size, num_labels))
    opt_state = unit_adamw(cfg.weight_decay).init(params)
    toks_all, seg_all = pad(encode(model, texts, cfg.max_len), model.cfg.pad_token_id, length=cfg.max_len)
    order = np.array([], np.int64)
    for s in range(steps):
        if len(order) < cfg.batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        params, opt_state, loss = _train_step(
            params, opt_state, schedule_value(lr, steps, cfg.warmup_frac, s), toks_all[idx], seg_all[idx], y[idx],
            cfg=model.cfg, mask=model.mask, how=pooling, weight_decay=cfg.weight_decay)
        if log and (s + 1) % max(1, steps // 4) == 0:
            log(f"  {model.name} lr {lr:g} step {s + 1}/{steps} loss {float(loss):.4f}")
    return params


def fine_tune(model: Model, train: Sequence[dict], labels: Optional[Sequence] = None,
              config: FinetuneConfig = FinetuneConfig(), log=print) -> Classifier:
    """Fine-tunes `model` on examples {text, label}; `labels` fixes the head's label order (default: sorted)."""
    pooling = config.pooling or "mean"
    check_pooling(model.arch, pooling)
    if not train:
        raise ValueError("no training examples")
    labels = tuple(labels) if labels is not None else tuple(sorted({ex["label"] for ex in train}))
    y = label_ids([ex["label"] for ex in train], labels, "training data")
    texts = [ex["text"] for ex in train]
    best, best_acc = None, -1.0
    if len(config.lrs) > 1:  # choose the learning rate on a held-out part of train
        perm = np.random.default_rng(config.seed).permutation(len(texts))
        n_dev = max(1, int(len(texts) * config.dev_frac))
        dev, fit = perm[:n_dev], perm[n_dev:]
        for lr in config.lrs:
            p = _train(model, [texts[i] for i in fit], y[fit], len(labels), pooling, lr, config, log)
            clf = Classifier(model, p, labels, pooling, config.max_len)
            acc = metrics.accuracy(clf.logits([texts[i] for i in dev]).argmax(-1), y[dev])
            if log:
                log(f"  {model.name} lr {lr:g}: dev accuracy {acc:.4f}")
            if acc > best_acc:
                best, best_acc = clf, acc
        return best
    p = _train(model, texts, y, len(labels), pooling, config.lrs[0], config, log)
    return Classifier(model, p, labels, pooling, config.max_len)


def evaluate(clf: Classifier, test: Sequence[dict]) -> dict:
    """accuracy, macro F1 and Matthews correlation on examples {text, label}."""
    gold = label_ids([ex["label"] for ex in test], clf.labels, "test data")
    pred = clf.logits([ex["text"] for ex in test]).argmax(-1)
    return dict(accuracy=metrics.accuracy(pred, gold), macro_f1=metrics.macro_f1(pred, gold),
                mcc=metrics.matthews_corrcoef(pred, gold))
