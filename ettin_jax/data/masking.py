"""MLM masking as a pure function of (seed, step, row): the same rows get the same masks on any host or worker.

Per row, exactly k = round(rate * n_eligible) positions are chosen uniformly among eligible tokens (real tokens that
are not special: [CLS], [SEP], [PAD], [MASK], [UNK]); of them 80% become [MASK], 10% a random non-special token and
10% stay. The count is exact so sparse prediction has static shapes: each row has P = ceil(rate * seq_len) slots
(positions, labels, weights), the unused ones zero.
"""
import math

import numpy as np

# Separates the masking random stream from any other use of the same seed.
_MLM_SALT = 0x4D4C4D


def num_mlm_slots(rate: float, seq_len: int) -> int:
    """P = ceil(rate * seq_len): prediction slots per row."""
    return int(math.ceil(rate * seq_len - 1e-9))


def row_rng(seed: int, step: int, row: int) -> np.random.Generator:
    """The counter-based generator for one row of one step (Philox keyed by a hash of the triple)."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([_MLM_SALT, seed, step, row])))


def mlm_mask(tokens: np.ndarray, segment_ids: np.ndarray, *, rate: float, seed: int, step: int, first_row: int,
             special_ids, mask_id: int, vocab_size: int) -> dict:
    """Masks rows `first_row .. first_row + b - 1` of the global batch of `step`.

    Args:
      tokens, segment_ids: int32 [b, T] (segment 0 = padding).
      rate: masking rate (0 < rate < 1).
      special_ids: ids never selected nor drawn as random replacements.
    Returns:
      dict of mlm_inputs [b, T] int32, mlm_positions [b, P] int32, mlm_labels [b, P] int32, mlm_weights [b, P] f32.
    """
    b, t = tokens.shape
    p = num_mlm_slots(rate, t)
    special = np.asarray(sorted(set(int(i) for i in special_ids)), np.int64)
    replacements = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), special)
    eligible_all = (segment_ids > 0) & ~np.isin(tokens, special)
    inputs = tokens.copy()
    positions = np.zeros((b, p), np.int32)
    labels = np.zeros((b, p), np.int32)
    weights = np.zeros((b, p), np.float32)
    for i in range(b):
        eligible = np.flatnonzero(eligible_all[i])
        k = min(p, int(round(rate * len(eligible))))
        if k == 0:
            continue
        rng = row_rng(seed, step, first_row + i)
        chosen = np.sort(rng.choice(eligible, size=k, replace=False))
        action = rng.random(k)
        random_ids = replacements[rng.integers(0, len(replacements), size=k)]
        positions[i, :k] = chosen
        labels[i, :k] = tokens[i, chosen]
        weights[i, :k] = 1.0
        new = np.where(action < 0.8, mask_id, np.where(action < 0.9, random_ids, tokens[i, chosen]))
        inputs[i, chosen] = new
    return dict(mlm_inputs=inputs, mlm_positions=positions, mlm_labels=labels, mlm_weights=weights)
