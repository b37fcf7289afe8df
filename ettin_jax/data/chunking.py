"""Ettin's chunking: a document's tokens become [CLS] ... [SEP] chunks of at most `seq_len` tokens.

Rules (ettin.md section 4): every chunk is [CLS] content [SEP] with at most seq_len - 2 content tokens; a document
longer than that is cut into full chunks, and its short tail is back-filled from the previous chunk (the last chunk
is the document's last seq_len - 2 tokens, overlapping the one before), so every chunk of a long document is full;
a chunk under `min_chunk_tokens` (32) tokens, which can only be a whole short document, is dropped.
"""
import numpy as np


def chunk_spans(n_tokens: int, seq_len: int, min_chunk_tokens: int = 32, backfill: bool = True):
    """Returns the [start, end) content spans of a document of `n_tokens` tokens, and how many chunks were dropped.

    Each span becomes one chunk [CLS] tokens[start:end] [SEP] of end - start + 2 tokens.
    """
    content = seq_len - 2
    if n_tokens <= 0:
        return [], 0
    if n_tokens <= content:
        if n_tokens + 2 < min_chunk_tokens:
            return [], 1
        return [(0, n_tokens)], 0
    spans = [(s, s + content) for s in range(0, n_tokens - content + 1, content)]
    tail_start = spans[-1][1]
    if tail_start < n_tokens:
        if backfill:
            spans.append((n_tokens - content, n_tokens))
        elif n_tokens - tail_start + 2 >= min_chunk_tokens:
            spans.append((tail_start, n_tokens))
        else:
            return spans, 1
    return spans, 0


def make_chunk(tokens: np.ndarray, start: int, end: int, cls_id: int, sep_id: int) -> np.ndarray:
    """[CLS] tokens[start:end] [SEP] as int32."""
    out = np.empty(end - start + 2, np.int32)
    out[0], out[-1] = cls_id, sep_id
    out[1:-1] = tokens[start:end]
    return out
