"""Metrics, in plain numpy: each is the textbook definition, tested against hand-computed values.

Classification: accuracy, macro F1, Matthews correlation (GLUE's CoLA metric). Retrieval: nDCG@k and MRR@k over a
ranking and graded relevance judgements (qrels), as in MTEB / BEIR (`pytrec_eval`: gain = relevance, discount
log2(rank + 1), the ideal ranking from the qrels). Pronoun probe: the share of each pronoun class.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Mapping, Sequence

import numpy as np


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    if pred.shape != gold.shape or pred.size == 0:
        raise ValueError(f"accuracy needs two equal-length non-empty label lists, got {pred.shape} and {gold.shape}")
    return float((pred == gold).mean())


def macro_f1(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Unweighted mean over the classes present in gold or pred of 2PR / (P + R) (0 where P + R = 0)."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    f1s = []
    for c in sorted(set(gold.tolist()) | set(pred.tolist())):
        tp = np.sum((pred == c) & (gold == c))
        fp = np.sum((pred == c) & (gold != c))
        fn = np.sum((pred != c) & (gold == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def matthews_corrcoef(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Multiclass Matthews correlation (Gorodkin's R_K, as scikit-learn); 0 when undefined."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    classes = sorted(set(gold.tolist()) | set(pred.tolist()))
    idx = {c: i for i, c in enumerate(classes)}
    cm = np.zeros((len(classes), len(classes)))
    for p, g in zip(pred.tolist(), gold.tolist()):
        cm[idx[g], idx[p]] += 1
    t, p = cm.sum(1), cm.sum(0)
    c, s = np.trace(cm), cm.sum()
    denom = math.sqrt((s * s - p @ p) * (s * s - t @ t))
    return 0.0 if denom == 0 else float((c * s - t @ p) / denom)


def majority_baseline(train_labels: Sequence, test_labels: Sequence) -> float:
    """Accuracy on test of always answering the most frequent training label."""
    top = Counter(train_labels).most_common(1)[0][0]
    return float(np.mean([y == top for y in test_labels]))


def ndcg_at_k(ranking: Sequence[str], relevance: Mapping[str, float], k: int = 10) -> float:
    """nDCG@k of one query: sum_{i<k} rel_i / log2(i + 2), over the same for the ideal order."""
    dcg = sum(relevance.get(d, 0) / math.log2(i + 2) for i, d in enumerate(list(ranking)[:k]))
    ideal = sorted((r for r in relevance.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return 0.0 if idcg == 0 else dcg / idcg


def mrr_at_k(ranking: Sequence[str], relevance: Mapping[str, float], k: int = 10) -> float:
    """1 / rank of the first relevant document within the top k (0 if none)."""
    for i, d in enumerate(list(ranking)[:k]):
        if relevance.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def retrieval_scores(rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, float]],
                     k: int = 10) -> dict:
    """Mean nDCG@k and MRR@k over the queries of `qrels` (a query without a ranking scores 0)."""
    if not qrels:
        raise ValueError("no relevance judgements (qrels) to score against")
    nd = [ndcg_at_k(rankings.get(q, []), rel, k) for q, rel in qrels.items()]
    mr = [mrr_at_k(rankings.get(q, []), rel, k) for q, rel in qrels.items()]
    return {f"ndcg@{k}": float(np.mean(nd)), f"mrr@{k}": float(np.mean(mr))}


def shares(choices: Sequence[str], classes: Sequence[str]) -> dict:
    """{class: fraction of `choices` equal to it}, for every class (0.0 where absent)."""
    if not choices:
        raise ValueError("no choices to count")
    unknown = set(choices) - set(classes)
    if unknown:
        raise ValueError(f"choices {sorted(unknown)} are not among the classes {list(classes)}")
    n = len(choices)
    counts = Counter(choices)
    return {c: counts[c] / n for c in classes}
