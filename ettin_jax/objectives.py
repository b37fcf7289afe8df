"""Training objectives: MLM (encoder), CLM (decoder) and MNTP (encoder trained from a decoder).

Each objective is a mask (what the model may see) plus a choice of which hidden states predict which labels;
all of them end in the same chunked cross-entropy over the tied 50k-way decoder:

    mlm:  bidirectional; hidden at each masked position predicts the original token there   (sparse prediction)
    mntp: bidirectional; hidden at position p-1 predicts the original token at masked position p  (LLM2Vec-style)
    clm:  causal; hidden at t predicts token t+1 when both are in the same document, never padding

The MLM corruption itself (80% [MASK], 10% random, 10% kept) is made by the data pipeline as a pure function of
(seed, step, row) (`ettin_jax.data`), so encoder and decoder read the very same batches: a batch carries `tokens`,
`segment_ids`, `positions` and, for masked objectives, `mlm_inputs`, `mlm_positions`, `mlm_labels`, `mlm_weights`.

Only the predicting positions pass through the head and decoder (sparse prediction), and the decoder's logits
exist `chunk` rows at a time: `decoder_cross_entropy` computes each chunk's loss *and* its gradients (with respect
to the features, the tied embedding and the bias) in one pass, so a [tokens, vocab] fp32 logit array never exists,
forward or backward, and no logit is computed twice (recomputing them under `jax.checkpoint`, as
`chunked_cross_entropy` does, costs a third more head FLOPs: for CLM the head is most of the model's work).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from ettin_jax import attention as attn_lib
from ettin_jax import flops, kernels
from ettin_jax.model import Ettin


@dataclasses.dataclass(frozen=True)
class Objective:
    """What an objective is: the mask the model attends with, the inputs it reads, and which positions predict."""

    name: str
    mask: attn_lib.Mask
    masked_inputs: bool  # reads mlm_inputs (corrupted) rather than tokens
    every_position: bool  # every token predicts its document's next token; else only the masked positions predict
    read_offset: int = 0  # a masked token at p is predicted from the hidden state at p + read_offset (MNTP: -1)

    @property
    def causal(self) -> bool:
        return self.mask.causal

    def predictions(self, *, tokens: float, masked: float) -> float:
        """Positions that go through the head and decoder, given the step's tokens and masked positions."""
        return tokens if self.every_position else masked

    def train_flops(self, cfg, *, tokens: float, masked: float, seq_len: int) -> float:
        """The model FLOPs of one training step of this objective (`flops.train_flops`)."""
        return flops.train_flops(cfg, tokens=tokens, predictions=self.predictions(tokens=tokens, masked=masked),
                                 seq_len=seq_len, causal=self.causal)


OBJECTIVES = {
    "mlm": Objective("mlm", attn_lib.BIDIRECTIONAL, masked_inputs=True, every_position=False),
    "mntp": Objective("mntp", attn_lib.BIDIRECTIONAL, masked_inputs=True, every_position=False, read_offset=-1),
    "clm": Objective("clm", attn_lib.CAUSAL, masked_inputs=False, every_position=True),
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def chunked_cross_entropy(predict: Callable, hidden, labels, weights, chunk: int = 1024):
    """Sum of weighted CE and of weighted correct predictions over N rows, `chunk` rows of logits at a time.

    predict: hidden [C, H] -> logits [C, V] (fp32). hidden [N, H], labels [N], weights [N].
    Returns (loss_sum, correct_sum, weight_sum), all fp32 scalars.
    """
    n, h = hidden.shape
    chunk = min(chunk, n)
    pad = (-n) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
        labels = jnp.pad(labels, (0, pad))
        weights = jnp.pad(weights, (0, pad))
    xs = (hidden.reshape(-1, chunk, h), labels.reshape(-1, chunk), weights.reshape(-1, chunk).astype(jnp.float32))

    @jax.checkpoint  # recompute each chunk's logits in the backward pass instead of keeping them
    def one(x, y, w):
        logits = predict(x).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
        correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
        return jnp.sum(w * (lse - picked)), jnp.sum(w * correct)

    def body(carry, x):
        loss, correct = one(*x)
        return (carry[0] + loss, carry[1] + correct), None

    if xs[0].shape[0] == 1:
        loss, correct = one(xs[0][0], xs[1][0], xs[2][0])
    else:
        (loss, correct), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(())), xs)
    return loss, correct, jnp.sum(weights.astype(jnp.float32))


def prediction_targets(objective: Objective, batch):
    """(gather index [B, P], labels [B, P], weights [B, P]) of the positions that predict."""
    if objective.every_position:  # the next token of the same document
        tokens, seg = batch["tokens"], batch["segment_ids"]
        labels = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
        next_seg = jnp.concatenate([seg[:, 1:], jnp.zeros_like(seg[:, :1])], axis=1)
        weights = ((seg == next_seg) & (seg > 0)).astype(jnp.float32)
        index = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return index, labels, weights
    positions = batch["mlm_positions"]
    if objective.read_offset:  # MNTP: masked tokens are never a document's first ([CLS]) token
        positions = jnp.maximum(positions + objective.read_offset, 0)
    return positions, batch["mlm_labels"], batch["mlm_weights"]


def prediction_count(objective: Objective, batch):
    """How many positions of `batch` predict (the denominator of the mean CE)."""
    _, _, weights = prediction_targets(objective, batch)
    return jnp.sum(weights.astype(jnp.float32))


def loss_fn(params, batch, *, model: Ettin, objective: Objective, dropout_rng=None, chunk: int = 1024,
            normalizer=None):
    """Mean CE over the predicting positions of `batch`, plus metrics (loss, accuracy, counts).

    normalizer: divide the sums by this count instead of the batch's own (gradient accumulation: the whole
    batch's count, so that summed micro-batch losses equal the full batch's mean exactly).
    """
    inputs = batch["mlm_inputs"] if objective.masked_inputs else batch["tokens"]
    deterministic = dropout_rng is None
    hidden = model.apply({"params": params}, inputs, mask=objective.mask, segment_ids=batch["segment_ids"],
                         positions=batch["positions"], deterministic=deterministic,
                         rngs=None if deterministic else {"dropout": dropout_rng})
    index, labels, weights = prediction_targets(objective, batch)
    if objective.every_position:  # no gather (and no scatter-add in the backward pass)
        picked = hidden
    else:
        picked = jnp.take_along_axis(hidden, index[..., None], axis=1)  # [B, P, H]
    h = picked.shape[-1]
    features = model.apply({"params": params}, picked.reshape(-1, h), method=Ettin.head)
    loss_sum, correct, count = kernels.decoder_cross_entropy(
        features, params["tok_embeddings"]["embedding"], params["decoder_bias"], labels.reshape(-1),
        weights.reshape(-1), chunk)
    denom = jnp.maximum(count if normalizer is None else normalizer, 1.0)
    loss = loss_sum / denom
    metrics = dict(loss=loss, accuracy=correct / denom, predictions=count,
                   tokens=jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32)))
    return loss, metrics
