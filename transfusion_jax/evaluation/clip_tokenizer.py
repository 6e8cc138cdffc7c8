"""CLIP's byte-level BPE tokenizer in plain Python (no torch, transformers, regex or ftfy).

Reads the `vocab.json` + `merges.txt` every Hugging Face CLIP directory ships and reproduces
OpenAI's `clip.tokenize` / HF's `CLIPTokenizer`: clean the text, split it into words, map each
word's UTF-8 bytes to printable characters, merge them by BPE rank with `</w>` marking the end of a
word, and frame the ids as `<|startoftext|> ... <|endoftext|>`, truncated or padded to the context
length. tests/test_clip.py checks the ids against transformers.

Cleaning is OpenAI's minus ftfy: HTML entities unescaped twice, Unicode NFC (which ftfy also
applies), whitespace collapsed, stripped, lowercased. Mojibake ("cafÃ©") is therefore not repaired
as OpenAI's ftfy would; HF's fast tokenizer does not repair it either, but it also does not unescape
HTML entities, so a caption with "&amp;" tokenizes here as in OpenAI's CLIP, not as in HF.
"""

import html
import json
import re
import unicodedata

import numpy as np

from transfusion_jax import paths

VOCAB = "vocab.json"
MERGES = "merges.txt"
START = "<|startoftext|>"
END = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's word pattern, `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|
# [^\s\p{L}\p{N}]+`, matched by `words` below: stdlib `re` has no \p{L} / \p{N}, and its
# `[^\W\d_]` / `\d` stand-ins count '²' or '½' (Unicode No) as letters, so we classify characters by
# their Unicode category instead. The literal alternatives are tried first, in the pattern's order.
_LITERALS = (START, END, "'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_WHITESPACE = re.compile(r"\s+")
_CACHE_LIMIT = 100_000


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table the BPE vocabulary is written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean(text: str) -> str:
    """CLIP's text normalisation without ftfy (see the module docstring)."""
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text)
    return _WHITESPACE.sub(" ", text).strip().lower()


def _kind(ch: str) -> str:
    """'L' letter, 'N' number, ' ' whitespace, else '.' (CLIP's punctuation-and-symbols class)."""
    category = unicodedata.category(ch)[0]
    if category in "LN":
        return category
    return " " if ch.isspace() else "."


def words(text: str) -> list[str]:
    """The pieces CLIP's pattern finds in cleaned text: special tokens, contractions, runs of
    letters, single digits and runs of other non-space characters; whitespace is dropped."""
    out, i, n = [], 0, len(text)
    while i < n:
        literal = next((s for s in _LITERALS if text.startswith(s, i)), None)
        if literal is not None:
            out.append(literal)
            i += len(literal)
            continue
        kind = _kind(text[i])
        j = i + 1
        if kind == " ":
            i = j
            continue
        if kind != "N":  # numbers are one character each, letters and symbols run on
            while j < n and _kind(text[j]) == kind:
                j += 1
        out.append(text[i:j])
        i = j
    return out


class CLIPTokenizer:
    """Texts -> int32 ids [N, context_length] for the CLIP text tower.

    Rows are `<|startoftext|>`, the caption's ids (cut to context_length - 2), `<|endoftext|>`, then
    `<|endoftext|>` padding as HF pads. Under the causal mask the padding never reaches the token
    that is pooled, which is the first `<|endoftext|>` both for HF's current pooling (first position
    equal to eos_token_id) and for its legacy one (argmax of the ids, `<|endoftext|>` having the
    largest id); `clip.CLIPScorer` checks that the config agrees.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], context_length=77):
        for token in (START, END):
            if token not in vocab:
                raise ValueError(f"the CLIP vocabulary has no {token}")
        if context_length < 2:
            raise ValueError(f"context_length={context_length}: needs room for start and end")
        self.vocab = vocab
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.context_length = context_length
        self.start_id, self.end_id = vocab[START], vocab[END]
        self.pad_id = self.end_id
        self.byte_encoder = bytes_to_unicode()
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_directory(cls, directory, context_length: int = 77) -> "CLIPTokenizer":
        """The tokenizer of a Hugging Face CLIP directory (its vocab.json and merges.txt)."""
        directory = paths.as_path(directory)
        vocab_file, merges_file = directory / VOCAB, directory / MERGES
        for file in (vocab_file, merges_file):
            if not file.is_file():
                raise FileNotFoundError(f"{directory}: no {file.name} (the CLIP BPE tokenizer)")
        try:
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{vocab_file}: not valid JSON ({e})") from e
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise ValueError(f"{vocab_file}: expected a JSON object of token -> id")
        merges = []
        for number, line in enumerate(merges_file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or (number == 1 and line.startswith("#version")):
                continue
            pair = line.split()
            if len(pair) != 2:
                raise ValueError(f"{merges_file}:{number}: expected two symbols, got {line!r}")
            merges.append((pair[0], pair[1]))
        try:
            return cls(vocab, merges, context_length)
        except ValueError as e:
            raise ValueError(f"{vocab_file}: {e}") from e

    def _bpe(self, word: str) -> tuple[int, ...]:
        """The ids of one word: its byte characters, `</w>` on the last, merged by rank."""
        if word in (START, END):
            return (self.vocab[word],)
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        chars = [self.byte_encoder[b] for b in word.encode("utf-8")]
        symbols = [*chars[:-1], chars[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:], strict=False))
            best = min(pairs, key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # every occurrence of the best pair, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        try:
            ids = tuple(self.vocab[s] for s in symbols)
        except KeyError as e:
            raise ValueError(f"BPE symbol {e.args[0]!r} is not in the vocabulary") from None
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """The caption's BPE ids, without start/end tokens or truncation."""
        return [i for word in words(clean(text)) for i in self._bpe(word)]

    def __call__(self, texts) -> np.ndarray:
        """int32 ids [N, context_length] of a caption or a list of captions."""
        if isinstance(texts, str):
            texts = [texts]
        ids = np.full((len(texts), self.context_length), self.pad_id, np.int32)
        for row, text in enumerate(texts):
            tokens = self.encode(text)[: self.context_length - 2]
            ids[row, : len(tokens) + 2] = [self.start_id, *tokens, self.end_id]
        return ids
