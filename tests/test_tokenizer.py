"""Tokenizers: round trips, the id layout (specials, padding), known GPT-2 ids, and bad specs."""

import pathlib
import socket
import sys

import numpy as np
import pytest

from transfusion_jax.batch import SpecialTokens
from transfusion_jax.data.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    WordTokenizer,
    make_tokenizer,
)

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
GPT2_BPE = DATA / "gpt2.tiktoken"
SHAKESPEARE = DATA / "tinyshakespeare.txt"

TEXTS = [
    "",
    "Hello world",
    "naïve café, Ünïcödé — déjà vu",
    "日本語のテキストと中文",
    "emoji 🎉👍🏽 and a family 👨‍👩‍👧 ",
    "  leading, trailing and  double spaces\n\nlines\ttabs\x00nul  ",
]


def specials(tok) -> list[int]:
    s = tok.special
    return [s.pad, s.bos, s.eos, s.boi, s.eoi]


def check_layout(tok, pad_to=128):
    """Specials distinct, inside the vocabulary, after the base tokens; vocab padded."""
    ids = specials(tok)
    assert len(set(ids)) == 5
    assert all(tok.num_base_tokens <= i < tok.vocab_size for i in ids)
    assert tok.vocab_size % pad_to == 0
    assert tok.vocab_size - pad_to < tok.num_base_tokens + 5 <= tok.vocab_size


def check_decode_skips(tok, text="to be or not"):
    ids = tok.encode(text)
    s = tok.special
    padding = list(range(tok.num_base_tokens + 5, tok.vocab_size))
    noisy = [s.bos, *ids[:2], s.boi, s.eoi, *ids[2:], s.eos, *padding, s.pad]
    assert tok.decode(noisy) == text
    assert tok.decode(np.asarray(noisy, np.int32)) == text
    assert isinstance(tok.decode(range(tok.vocab_size)), str)  # every id decodes


# Bytes.


@pytest.mark.parametrize("text", TEXTS)
def test_bytes_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == [b + 5 for b in text.encode("utf-8")]
    assert all(5 <= i < 261 for i in ids)
    assert tok.decode(ids) == text


def test_bytes_layout():
    tok = ByteTokenizer()
    assert tok.special == SpecialTokens()  # the defaults hand-made data uses
    assert specials(tok) == [0, 1, 2, 3, 4]
    assert (tok.num_base_tokens, tok.vocab_size) == (256, 384)
    assert ByteTokenizer(pad_to=1).vocab_size == 261
    assert ByteTokenizer(pad_to=64).vocab_size == 320
    check_decode_skips(tok)


def test_bytes_decode_invalid_utf8():
    tok = ByteTokenizer()
    bad = [0xFF + 5, 0xFE + 5, ord("a") + 5, "é".encode()[0] + 5]  # stray bytes, cut-off char
    assert tok.decode(bad) == "\ufffd\ufffda\ufffd"


# tiktoken, on the GPT-2 (r50k_base) ranks file.


@pytest.fixture(scope="module")
def gpt2():
    pytest.importorskip("tiktoken")
    if not GPT2_BPE.is_file():
        pytest.skip(f"{GPT2_BPE} is absent")
    return TiktokenTokenizer(str(GPT2_BPE))


def test_tiktoken_known_gpt2_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the") == [262]
    assert gpt2.decode([15496, 995]) == "Hello world"


def test_tiktoken_layout(gpt2):
    lines = [line for line in GPT2_BPE.read_bytes().splitlines() if line]
    # The file holds the 50,256 BPE ranks; GPT-2's <|endoftext|> (50256) is not in it.
    assert gpt2.num_base_tokens == len(lines) == 50256
    assert gpt2.vocab_size == 50304
    assert specials(gpt2) == list(range(50256, 50261))
    check_layout(gpt2)
    check_decode_skips(gpt2)
    assert gpt2.decode(gpt2.encode("<|endoftext|>")) == "<|endoftext|>"  # plain text here


def test_tiktoken_round_trip(gpt2):
    for text in TEXTS:
        assert gpt2.decode(gpt2.encode(text)) == text
    if SHAKESPEARE.is_file():
        passage = SHAKESPEARE.read_text(encoding="utf-8")[100_000:130_000]
        ids = gpt2.encode(passage)
        assert len(ids) < len(passage) / 3  # BPE compresses English
        assert gpt2.decode(ids) == passage


def test_tiktoken_reads_file_offline(gpt2, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tokenizer tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert TiktokenTokenizer(str(GPT2_BPE)).encode(" the") == [262]


# SentencePiece, on a small BPE model the test trains.


def training_text() -> str:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")
    rng = np.random.default_rng(0)  # made-up words, enough distinct merges for 500 pieces
    syllables = [c + v for c in "bcdfghklmnprstvw" for v in "aeiou"]
    words = ["".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(2000)]
    lines = [
        " ".join(rng.choice(words, rng.integers(3, 12))).capitalize() + "." for _ in range(8000)
    ]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    text = training_text()
    train, held_out = text[:300_000], text[-20_000:]
    folder = tmp_path_factory.mktemp("sentencepiece")
    (folder / "train.txt").write_text(train, encoding="utf-8")
    spm.SentencePieceTrainer.train(  # Llama-2's settings: bpe, byte fallback, no normalisation
        input=str(folder / "train.txt"),
        model_prefix=str(folder / "tok"),
        vocab_size=500,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    return str(folder / "tok.model"), held_out


def test_sentencepiece(sp_model):
    path, held_out = sp_model
    tok = SentencePieceTokenizer(path)
    assert tok.num_base_tokens == tok.processor.get_piece_size() == 500
    assert tok.vocab_size == 512
    # Appended after the model's pieces, distinct from its own <unk> <s> </s> (0, 1, 2).
    assert specials(tok) == [500, 501, 502, 503, 504]
    check_layout(tok)
    check_decode_skips(tok)
    ids = tok.encode(held_out)
    assert all(0 <= i < 500 for i in ids)
    assert tok.processor.bos_id() not in ids and tok.processor.eos_id() not in ids
    assert len(ids) < len(held_out) / 1.5
    assert tok.decode(ids) == held_out
    for text in TEXTS:  # byte fallback covers what training never saw
        assert tok.decode(tok.encode(text)) == text
    assert make_tokenizer(f"sentencepiece:{path}", pad_to=256).vocab_size == 512


# Words.

SHAPES_WORDS = (
    "a,small,large,red,green,blue,yellow,black,circle,square,triangle,above,below,left,right,of"
)


@pytest.mark.parametrize("text", TEXTS + ["a small redder circle, left of 3 squares!", "of of  a"])
def test_words_round_trip(text):
    tok = make_tokenizer(f"words:{SHAPES_WORDS}")
    assert tok.decode(tok.encode(text)) == text


def test_words_are_one_id_each_and_the_rest_is_bytes():
    tok = make_tokenizer(f"words:{SHAPES_WORDS}")
    words = SHAPES_WORDS.split(",")
    caption = "a small black triangle above a large red circle"
    ids = tok.encode(caption)
    assert len(ids) == len(caption.split())  # a token per word, the space inside it
    assert [tok.decode([i]) for i in ids] == ["a", *(" " + w for w in caption.split()[1:])]
    # a word id is 261 + 2 * (its index in the list), its spaced form one more
    assert ids[:2] == [261 + 2 * words.index("a"), 262 + 2 * words.index("small")]
    # text with no listed word encodes exactly as bytes: "reddish" and "Red" are not "red"
    other = "reddish Red 12 circles\n"
    assert tok.encode(other) == ByteTokenizer().encode(other)
    assert tok.encode("red, red") == [tok.encode("red")[0], *ByteTokenizer().encode(","), ids[-2]]


def test_words_layout():
    tok = make_tokenizer(f"words:{SHAPES_WORDS}")
    assert isinstance(tok, WordTokenizer)
    assert tok.special == SpecialTokens()  # the bytes tokenizer's ids, words after them
    assert (tok.num_base_tokens, tok.num_ids, tok.vocab_size) == (256 + 32, 293, 384)
    check_decode_skips(tok, "a red circle above reddish squares")
    assert all(0 <= i < tok.num_ids for i in tok.encode("a small red circle above a dog"))


@pytest.mark.parametrize("spec", ["words:", "words:red,,blue", "words:red,red", "words:red 2"])
def test_words_refuses_a_bad_list(spec):
    with pytest.raises(ValueError, match="data.tokenizer.*words:"):
        make_tokenizer(spec)


# make_tokenizer.


def test_make_tokenizer_bytes():
    assert isinstance(make_tokenizer(), ByteTokenizer)
    assert make_tokenizer("bytes", pad_to=64).vocab_size == 320


def test_make_tokenizer_errors(tmp_path):
    kinds = "'bytes', 'words:W1,W2,...', 'sentencepiece:PATH', 'tiktoken:PATH'"
    with pytest.raises(ValueError, match=kinds):
        make_tokenizer("wordpiece:vocab.txt")
    with pytest.raises(ValueError, match="needs a file"):
        make_tokenizer("tiktoken")
    with pytest.raises(ValueError, match="takes no path"):
        make_tokenizer("bytes:x")
    missing = tmp_path / "absent.tiktoken"
    with pytest.raises(FileNotFoundError, match="data.tokenizer") as info:
        make_tokenizer(f"tiktoken:{missing}")
    assert str(missing) in str(info.value)


@pytest.mark.parametrize(
    "kind, module", [("tiktoken", "tiktoken"), ("sentencepiece", "sentencepiece")]
)
def test_missing_library_names_the_extra(tmp_path, monkeypatch, kind, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    (tmp_path / "file").write_text("")
    with pytest.raises(ImportError, match=r"transfusion_jax\[text\]"):
        make_tokenizer(f"{kind}:{tmp_path / 'file'}")
