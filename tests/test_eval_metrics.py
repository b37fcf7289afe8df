"""Evaluation metrics against values computed by hand."""
import math

import numpy as np
import pytest

from ettin_jax.evaluation import metrics


def test_accuracy_f1_mcc_by_hand():
    pred, gold = [0, 0, 1, 1], [0, 1, 1, 1]
    assert metrics.accuracy(pred, gold) == 0.75
    # class 0: tp 1, fp 1, fn 0 -> 2/3; class 1: tp 2, fp 0, fn 1 -> 4/5
    assert metrics.macro_f1(pred, gold) == pytest.approx((2 / 3 + 4 / 5) / 2)
    # TP 2, TN 1, FP 0, FN 1: (2*1 - 0*1) / sqrt(2 * 3 * 1 * 2)
    assert metrics.matthews_corrcoef(pred, gold) == pytest.approx(2 / math.sqrt(12))
    assert metrics.matthews_corrcoef([1, 1, 1], [0, 1, 1]) == 0.0  # undefined -> 0
    assert metrics.matthews_corrcoef([2, 0, 1], [2, 0, 1]) == pytest.approx(1.0)


def test_accuracy_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="equal-length"):
        metrics.accuracy([0, 1], [0])


def test_majority_baseline():
    assert metrics.majority_baseline(["a", "a", "b"], ["a", "b", "b", "b"]) == 0.25


def test_ndcg_and_mrr_by_hand():
    rel = {"c": 1}
    assert metrics.ndcg_at_k(["a", "b", "c"], rel) == pytest.approx(1 / math.log2(4))  # rank 3: 0.5
    assert metrics.mrr_at_k(["a", "b", "c"], rel) == pytest.approx(1 / 3)
    assert metrics.ndcg_at_k(["c"], rel) == 1.0
    # graded: DCG = 1/log2(2) + 3/log2(4) = 2.5; ideal = 3/log2(2) + 1/log2(3)
    assert metrics.ndcg_at_k(["a", "b", "c"], {"a": 1, "c": 3}) == pytest.approx(2.5 / (3 + 1 / math.log2(3)))
    ranking = [f"x{i}" for i in range(10)] + ["c"]  # relevant at rank 11: outside the top 10
    assert metrics.ndcg_at_k(ranking, rel, 10) == 0.0 and metrics.mrr_at_k(ranking, rel, 10) == 0.0
    scores = metrics.retrieval_scores({"q1": ["c"], "q2": ["a", "c"]}, {"q1": rel, "q2": rel})
    assert scores["mrr@10"] == pytest.approx((1 + 0.5) / 2)
    assert scores["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 2)


def test_shares():
    s = metrics.shares(["male", "neutral", "neutral", "female"], ("male", "female", "neutral"))
    assert s == {"male": 0.25, "female": 0.25, "neutral": 0.5}
    with pytest.raises(ValueError, match="not among the classes"):
        metrics.shares(["other"], ("male", "female", "neutral"))


def test_in_batch_loss_by_hand():
    from ettin_jax.evaluation.retrieval import in_batch_loss
    eye = np.eye(2, dtype=np.float32)
    # logits [[20, 0], [0, 20]]: each row's loss is log(1 + e^-20)
    assert float(in_batch_loss(eye, eye, 20.0)) == pytest.approx(math.log1p(math.exp(-20)), abs=1e-7)
    q = np.array([[1, 0], [2, 0]], np.float32)  # both queries point at document 0; query 1's positive is doc 1
    expected = (math.log1p(math.exp(-20)) + 20 + math.log1p(math.exp(-20))) / 2
    assert float(in_batch_loss(q, eye, 20.0)) == pytest.approx(expected, rel=1e-6)


def test_pooling_by_hand():
    from ettin_jax.evaluation.models import pool
    # two rows, right-padded: row 0 has 3 real tokens, row 1 has 1
    hidden = np.arange(2 * 4 * 2, dtype=np.float32).reshape(2, 4, 2)  # hidden[b, t] = [8b + 2t, 8b + 2t + 1]
    seg = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.int32)
    np.testing.assert_array_equal(pool(hidden, seg, "cls"), [[0, 1], [8, 9]])
    np.testing.assert_array_equal(pool(hidden, seg, "last"), [[4, 5], [8, 9]])  # token 2 of row 0, token 0 of row 1
    np.testing.assert_allclose(pool(hidden, seg, "mean"), [[2, 3], [8, 9]])  # (0 + 2 + 4) / 3, padding left out
    with pytest.raises(ValueError, match="unknown pooling 'max'; expected mean, cls or last"):
        pool(hidden, seg, "max")


def test_classification_optimizer_warmup_linear_decay_and_decoupled_weight_decay():
    """With a constant gradient Adam's normalised step is g / (|g| + eps) at every step, so each update is
    lr_t * (1 / (1 + eps) + wd * w) on a matrix and lr_t / (1 + eps) on a vector (no decay): the schedule and the
    decoupled decay can be read off by hand. 50 steps, 6% warmup -> 3 warmup steps, then 47 of linear decay."""
    import jax
    from ettin_jax.evaluation.classification import make_optimizer
    lr, wd, steps, eps = 1e-2, 0.1, 50, 1e-6
    tx = make_optimizer(lr, steps, warmup_frac=0.06, weight_decay=wd)
    params = dict(w=np.full((2, 2), 2.0, np.float32), b=np.full((2,), 2.0, np.float32))
    grads = jax.tree_util.tree_map(np.ones_like, params)
    state = tx.init(params)
    hand_lr = [lr * t / 3 if t < 3 else lr * (1 - (t - 3) / 47) for t in range(steps)]
    assert hand_lr[1] == pytest.approx(lr / 3) and hand_lr[3] == lr and hand_lr[26] == pytest.approx(lr * 24 / 47)
    w = b = 2.0
    for t in range(steps):
        updates, state = tx.update(grads, state, params)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
        w -= hand_lr[t] * (1 / (1 + eps) + wd * w)  # decoupled: decay scaled by lr_t, not by Adam's normaliser
        b -= hand_lr[t] / (1 + eps)
        np.testing.assert_allclose(params["b"], b, rtol=1e-6, err_msg=f"step {t}: learning rate {hand_lr[t]:g}")
        np.testing.assert_allclose(params["w"], w, rtol=1e-6, err_msg=f"step {t}: decayed weight")
    assert float(params["b"][0]) == pytest.approx(2.0 - sum(hand_lr) / (1 + eps), rel=1e-6)
