"""Perplexity and bits per byte of held-out text.

Each document is scored as `BOS text`: every token of the text is predicted once, from the tokens
before it (a document longer than a row goes on in rows that start half a row back, so every
target keeps at least half a row of context, as strided evaluations of language models do). The
EOS after the text is not scored, so the same text costs the same whatever tokenizer wrote it:
bits per byte = the summed negative log likelihood (nats) / ln 2 / the text's UTF-8 bytes, and
runs with different tokenizers compare on it. Perplexity = exp(mean negative log likelihood per
token) is per token, so only runs sharing a tokenizer compare on it.
"""

import math

import numpy as np


def perplexity(total_nll: float, num_tokens: int) -> float:
    """exp of the mean negative log likelihood (nats) per predicted token."""
    if num_tokens <= 0:
        raise ValueError("perplexity needs at least one predicted token")
    return math.exp(total_nll / num_tokens)


def bits_per_byte(total_nll: float, num_bytes: int) -> float:
    """The negative log likelihood of a text (nats) in bits per UTF-8 byte of it."""
    if num_bytes <= 0:
        raise ValueError("bits per byte needs at least one byte of text")
    return total_nll / math.log(2) / num_bytes


def text_windows(token_lists, seq_len: int, bos: int, pad: int):
    """Rows scoring every token of each document once, each with as much context as a row holds.

    Returns (tokens int32 [R, seq_len], weights float32 [R, seq_len], lengths int [R]):
    weights[r, p] = 1 where the token at p + 1 is scored from the row up to p; row r holds
    lengths[r] tokens, then `pad`. A document `t1..tn` is `BOS t1 .. tn`; its
    first row holds the first seq_len positions and scores all their targets; a longer document
    goes on in rows that start half a row back (a strided evaluation: every later target sees at
    least seq_len / 2 tokens before it) and score only the targets not scored yet."""
    if seq_len < 2:
        raise ValueError(f"seq_len {seq_len}: a row needs room for a context and a target")
    rows, weights, lengths = [], [], []
    for ids in token_lists:
        sequence = [bos, *ids]
        scored = 1  # index in `sequence` of the first target not yet scored
        start = 0
        while scored < len(sequence):
            stop = min(start + seq_len, len(sequence))
            row = np.full(seq_len, pad, np.int32)
            row[: stop - start] = sequence[start:stop]
            w = np.zeros(seq_len, np.float32)
            w[scored - start - 1 : stop - start - 1] = 1.0  # position p predicts p + 1
            rows.append(row)
            weights.append(w)
            lengths.append(stop - start)
            scored = stop
            start = stop - seq_len // 2
    return np.stack(rows), np.stack(weights), np.asarray(lengths)
