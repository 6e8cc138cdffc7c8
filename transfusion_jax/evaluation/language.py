"""Perplexity and bits per byte of held-out text.

Each document is scored as `BOS text`: every token of the text is predicted once, from the tokens
before it (a document longer than a row continues in the next row, which starts again with the
last token of the previous one as its context). The EOS after the text is not scored, so the
same text costs the same whatever tokenizer wrote it: bits per byte = the summed negative log
likelihood (nats) / ln 2 / the text's UTF-8 bytes, and runs with different tokenizers compare on
it. Perplexity = exp(mean negative log likelihood per token) is per token, so only runs sharing a
tokenizer compare on it.
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
    """Rows scoring every token of each document once.

    Returns (tokens int32 [R, seq_len], weights float32 [R, seq_len]): weights[r, p] = 1 where the
    token at p + 1 is scored from the row up to p. A document `t1..tn` is `BOS t1 .. tn`; a row
    holds seq_len of those positions and scores seq_len - 1 targets; the next row starts at the
    last position the previous one held."""
    if seq_len < 2:
        raise ValueError(f"seq_len {seq_len}: a row needs room for a context and a target")
    rows, weights = [], []
    for ids in token_lists:
        sequence = [bos, *ids]
        for start in range(0, max(1, len(sequence) - 1), seq_len - 1):
            window = sequence[start : start + seq_len]
            row = np.full(seq_len, pad, np.int32)
            row[: len(window)] = window
            w = np.zeros(seq_len, np.float32)
            w[: len(window) - 1] = 1.0
            rows.append(row)
            weights.append(w)
    return np.stack(rows), np.stack(weights)
