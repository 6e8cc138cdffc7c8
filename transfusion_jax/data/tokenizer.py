"""Text tokenizers: text <-> ids, with our five special tokens and a padded vocabulary.

Every tokenizer has `num_base_tokens` content ids, the five `SpecialTokens` (pad, bos, eos, boi,
eoi) on ids of their own, and `vocab_size` rounded up to a multiple of `pad_to` so the embedding
and the output layer shard evenly; the ids in the padding range are never produced. `encode` adds
no special tokens (the document builders in `batch.py` place them); `decode` drops specials and
padding ids, so any id the model can emit decodes without error.

`make_tokenizer` reads the config field `data.tokenizer`: "bytes" (no file needed),
"words:W1,W2,..." (bytes plus one id per listed word, for captions of a closed vocabulary),
"sentencepiece:PATH" (e.g. a Llama-2 tokenizer.model) or "tiktoken:PATH" (a BPE ranks file such as
GPT-2's r50k_base). The last two need `pip install transfusion_jax[text]`.
"""

import base64
import hashlib
import importlib
import os
import re
from collections.abc import Iterable

import numpy as np

from transfusion_jax.batch import SpecialTokens
from transfusion_jax.paths import as_path, is_local

# GPT-2's pre-tokenisation regex (tiktoken's r50k_base pattern).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
KINDS = ("bytes", "words", "sentencepiece", "tiktoken")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _appended_specials(first: int) -> SpecialTokens:
    """Specials on ids first, first + 1, ... in the order pad, bos, eos, boi, eoi."""
    return SpecialTokens(pad=first, bos=first + 1, eos=first + 2, boi=first + 3, eoi=first + 4)


def _import_optional(name: str):
    """Imports an optional dependency (the `text` extra) only when its tokenizer is built."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        package = name.split(".")[0]
        raise ImportError(
            f"this tokenizer needs the `{package}` package: pip install 'transfusion_jax[text]'"
        ) from e


class Tokenizer:
    """Base: the id layout (base tokens, specials, padding) shared by all tokenizers."""

    special: SpecialTokens
    num_base_tokens: int
    vocab_size: int

    def __init__(self, num_base_tokens: int, special: SpecialTokens, pad_to: int = 128):
        if pad_to < 1:
            raise ValueError(f"pad_to must be >= 1, got {pad_to}")
        specials = (special.pad, special.bos, special.eos, special.boi, special.eoi)
        if len(set(specials)) != len(specials):
            raise ValueError(f"special token ids must be distinct: {special}")
        self.num_base_tokens, self.special = num_base_tokens, special
        # Ids [0, num_ids) can occur; [num_ids, vocab_size) is padding the model must not emit.
        self.num_ids = max(num_base_tokens + len(specials), max(specials) + 1)
        self.vocab_size = _round_up(self.num_ids, pad_to)

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, with no special tokens added."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; special and padding-range ids are skipped."""
        raise NotImplementedError

    @staticmethod
    def _as_list(ids: Iterable[int]) -> list[int]:
        """Accepts lists, numpy and jax arrays alike."""
        return np.asarray(ids, dtype=np.int64).reshape(-1).tolist()


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: needs no file and round-trips any string, at ~4x the length of a BPE.

    Ids 0..4 are the specials in `SpecialTokens`' default order, byte b is id b + 5 (ids 5..260),
    so hand-made data and the synthetic source (which use the defaults) agree with it.
    """

    OFFSET = 5

    def __init__(self, pad_to: int = 128, num_extra: int = 0):
        super().__init__(256 + num_extra, SpecialTokens(), pad_to)  # extra ids follow the bytes

    def encode(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(i - self.OFFSET for i in self._as_list(ids) if 0 <= i - self.OFFSET < 256)
        return data.decode("utf-8", errors="replace")


class WordTokenizer(ByteTokenizer):
    """Bytes plus one id for each listed word, alone or after a space (" red"): a caption of a
    closed vocabulary ("a small red circle above a large blue square") becomes a token per word
    instead of one per byte, so a small model binds each attribute to one position and a row
    holds three times the captions. Text outside the list falls back to bytes, so every string
    round-trips. Ids: the bytes tokenizer's 0..260, then word i as 261 + 2i, " word" 262 + 2i.
    The list lives in the spec itself, so a run's saved config rebuilds it anywhere.
    """

    WORD = r"[^\W\d_]+"  # letters only
    PIECE = re.compile(rf" ?{WORD}|.", re.DOTALL)  # " word" / "word", else one character

    def __init__(self, words: Iterable[str], pad_to: int = 128):
        words = list(words)
        bad = [w for w in words if not re.fullmatch(self.WORD, w)]
        if bad or not words or len(set(words)) != len(words):
            raise ValueError(
                f"config field data.tokenizer: 'words:' takes distinct comma-separated words of "
                f"letters only, e.g. 'words:red,green,circle'; got {','.join(words)!r}"
            )
        super().__init__(pad_to, num_extra=2 * len(words))
        first = 256 + self.OFFSET
        self.piece_ids = {w: first + 2 * i for i, w in enumerate(words)}
        self.piece_ids |= {" " + w: first + 2 * i + 1 for i, w in enumerate(words)}
        self.pieces = {i: piece for piece, i in self.piece_ids.items()}

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.PIECE.findall(text):
            if piece in self.piece_ids:
                ids.append(self.piece_ids[piece])
            else:
                ids.extend(super().encode(piece))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        data = bytearray()
        for i in self._as_list(ids):
            if i in self.pieces:
                data += self.pieces[i].encode("utf-8")
            elif 0 <= i - self.OFFSET < 256:
                data.append(i - self.OFFSET)
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file (e.g. Llama-2's tokenizer.model), ids 0..n-1 as in the model.

    Our specials are appended after the model's n pieces (pad = n, bos = n + 1, ...) rather than
    reusing the model's own <s> / </s>: Llama-2 has no pad id, and its bos/eos cannot double as
    BOI/EOI, so appending gives five distinct ids the same way for every model.
    """

    def __init__(self, model_path: str, pad_to: int = 128):
        spm = _import_optional("sentencepiece")
        self.model_path = str(model_path)
        # read through epath: a local path or a URL (gs://)
        self.processor = spm.SentencePieceProcessor(
            model_proto=as_path(self.model_path).read_bytes()
        )
        n = self.processor.get_piece_size()
        super().__init__(n, _appended_specials(n), pad_to)

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        n = self.num_base_tokens
        # The model's own control pieces (<s>, </s>) are dropped by SentencePiece itself.
        return self.processor.decode([i for i in self._as_list(ids) if 0 <= i < n])


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE ranks file (e.g. GPT-2's r50k_base) with GPT-2's split regex.

    Ids 0..n-1 are the ranks in the file. The file holds no special tokens (GPT-2's <|endoftext|>
    is not in it) and we register none inside tiktoken, so "<|endoftext|>" in the text is encoded
    as plain text; our specials are appended after the ranks (pad = n, bos = n + 1, ...).
    """

    def __init__(self, bpe_path: str, pad_to: int = 128):
        tiktoken = _import_optional("tiktoken")
        load_tiktoken_bpe = _import_optional("tiktoken.load").load_tiktoken_bpe
        self.bpe_path = str(bpe_path)
        # A local path is read with open(), never fetched. tiktoken also caches it, keyed by the
        # path alone; the expected hash makes it re-read the file when that copy is stale.
        data = as_path(self.bpe_path).read_bytes()
        if is_local(self.bpe_path):
            ranks = load_tiktoken_bpe(self.bpe_path, expected_hash=hashlib.sha256(data).hexdigest())
        else:  # a URL (gs://), which tiktoken would read with blobfile: "base64 rank" lines
            lines = (line.split() for line in data.splitlines() if line)
            ranks = {base64.b64decode(token): int(rank) for token, rank in lines}
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError(f"{self.bpe_path}: the BPE ranks are not 0..{len(ranks) - 1}")
        self.encoding = tiktoken.Encoding(
            name=os.path.basename(self.bpe_path),
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={},
        )
        super().__init__(len(ranks), _appended_specials(len(ranks)), pad_to)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        n = self.num_base_tokens
        return self.encoding.decode([i for i in self._as_list(ids) if 0 <= i < n], "replace")


def make_tokenizer(spec: str = "bytes", pad_to: int = 128) -> Tokenizer:
    """The tokenizer named by the config field `data.tokenizer`: "bytes", "KIND:PATH"."""
    kind, _, path = spec.partition(":")
    if kind not in KINDS:
        raise ValueError(
            f"config field data.tokenizer: {spec!r} is not one of 'bytes', "
            "'words:W1,W2,...', 'sentencepiece:PATH', 'tiktoken:PATH'"
        )
    if kind == "bytes":
        if path:
            raise ValueError(f"config field data.tokenizer: 'bytes' takes no path, got {spec!r}")
        return ByteTokenizer(pad_to)
    if kind == "words":
        return WordTokenizer(path.split(","), pad_to)
    if not path:
        raise ValueError(f"config field data.tokenizer: {spec!r} needs a file, '{kind}:PATH'")
    path = os.path.expanduser(path)
    if not as_path(path).is_file():
        raise FileNotFoundError(f"config field data.tokenizer: {kind} file {path!r} does not exist")
    cls = SentencePieceTokenizer if kind == "sentencepiece" else TiktokenTokenizer
    return cls(path, pad_to)
