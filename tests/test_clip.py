"""CLIP against transformers' CLIPModel / CLIPTokenizer / CLIPImageProcessor, the references.

The reference model is tiny and random with every parameter perturbed (LayerNorm weights start at
exactly 1 and biases at 0, which would hide a swapped or untransposed tensor); it is saved with
save_pretrained and read back through load_clip, the path a downloaded openai/clip-* takes. Its
tokenizer files hold ~300 BPE merges learned CLIP-style from Shakespeare.
"""

import collections
import json
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from tests.helpers import importable_torchvision
from transfusion_jax.evaluation import clip as clip_lib
from transfusion_jax.evaluation import clip_tokenizer as ct

torch = pytest.importorskip("torch", reason="the reference CLIP is transformers' PyTorch model")
importable_torchvision(torch)  # transformers imports torchvision whenever it is installed
transformers = pytest.importorskip("transformers", reason="the reference CLIP is transformers'")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SENTENCES = [
    "First Citizen: we know't, we KNOW'T!!",
    "  It's 2024...   the year's   best  ",
    "don't 'tis ''s ''hello they'll we'd I'm you've we're",
    "Café naïve ½ ² 東京 Cafe\u0301 résumé",
    "tab\tand\nnewline, x_y-z 3.14159 $100 (a+b)=c",
    "emoji 😀🎉 ok",
    "",
    "Speak, speak. " * 30,  # far beyond 77 tokens: truncated, still ending in <|endoftext|>
]


def learn_merges(text: str, count: int) -> list[tuple[str, str]]:
    """BPE merges learned as CLIP's were: on CLIP's words, with `</w>` on each word's last byte."""
    byte = ct.bytes_to_unicode()
    words = collections.Counter()
    for word in ct.words(ct.clean(text)):
        chars = [byte[b] for b in word.encode("utf-8")]
        words[(*chars[:-1], chars[-1] + ct.END_OF_WORD)] += 1
    merges = []
    for _ in range(count):
        pairs = collections.Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def write_tokenizer(directory: pathlib.Path, merges) -> int:
    """vocab.json / merges.txt in CLIP's layout; returns the vocabulary size."""
    chars = list(ct.bytes_to_unicode().values())
    tokens = [*chars, *(c + ct.END_OF_WORD for c in chars), *("".join(m) for m in merges)]
    vocab = {t: i for i, t in enumerate([*tokens, ct.START, ct.END])}
    (directory / ct.VOCAB).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = "".join(f"{a} {b}\n" for a, b in merges)
    (directory / ct.MERGES).write_text("#version: 0.2\n" + lines, encoding="utf-8")
    return len(vocab)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent")
    directory = tmp_path_factory.mktemp("clip_tokenizer")
    write_tokenizer(directory, learn_merges(SHAKESPEARE.read_text()[:20_000], 300))
    return directory


def reference_clip(directory: pathlib.Path, tokenizer_dir, *, act: str, legacy_eos: bool):
    """A tiny perturbed transformers CLIPModel saved (with the tokenizer files) in `directory`."""
    for name in (ct.VOCAB, ct.MERGES):
        shutil.copy(tokenizer_dir / name, directory / name)
    vocab = json.loads((directory / ct.VOCAB).read_text(encoding="utf-8"))
    tower = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    config = transformers.CLIPConfig(
        text_config=dict(
            **tower,
            vocab_size=len(vocab) + 5,
            max_position_embeddings=77,
            hidden_act=act,
            eos_token_id=2 if legacy_eos else vocab[ct.END],
        ),
        vision_config=dict(**tower, image_size=32, patch_size=8, hidden_act=act),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    return model


def hf_features(out):
    """transformers >= 5 returns a model output whose pooler_output is the projection."""
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    out = out / out.norm(dim=-1, keepdim=True)
    return out.detach().numpy()


def test_tokenizer_matches_transformers(tokenizer_dir):
    ours = ct.CLIPTokenizer.from_directory(tokenizer_dir)
    hf = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    want = hf(SENTENCES, truncation=True, max_length=77, padding="max_length")["input_ids"]
    got = ours(SENTENCES)
    assert got.dtype == np.int32 and got.shape == (len(SENTENCES), 77)
    for sentence, g, w in zip(SENTENCES, got.tolist(), want, strict=True):
        assert g == w, sentence
    assert got[-1, -1] == ours.end_id and ours.end_id in got[0]
    assert ct.words("a²b ½") == ["a", "²", "b", "½"]  # numbers (No) are not letters


@pytest.mark.parametrize("act,legacy_eos", [("quick_gelu", True), ("gelu", False)])
def test_features_and_scores_match_transformers(tmp_path, tokenizer_dir, act, legacy_eos):
    ref = reference_clip(tmp_path, tokenizer_dir, act=act, legacy_eos=legacy_eos)
    scorer = clip_lib.load_clip(tmp_path, batch_size=3)  # 5 inputs: one full, one padded batch
    assert scorer.cfg.text.hidden_act == act and (scorer.cfg.eos_token_id == 2) == legacy_eos

    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(5, 32, 32, 3)).astype(np.float32)
    texts = SENTENCES[:5]
    ids = scorer.tokenizer(texts)
    with torch.no_grad():
        want_image = hf_features(
            ref.get_image_features(torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
        )
        want_text = hf_features(ref.get_text_features(torch.from_numpy(ids.astype(np.int64))))
    got_image, got_text = scorer.pixel_features(pixels), scorer.text_features(texts)
    np.testing.assert_allclose(got_image, want_image, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_text, want_text, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        clip_lib.pair_scores(got_image, got_text),
        100 * np.maximum(np.sum(want_image * want_text, axis=-1), 0),
        rtol=1e-4,
        atol=1e-3,
    )

    images = rng.integers(0, 256, size=(4, 40, 48, 3), dtype=np.uint8)
    with torch.no_grad():
        hf_pixels = torch.from_numpy(scorer.preprocess(images).transpose(0, 3, 1, 2))
        want = hf_features(ref.get_image_features(hf_pixels))
    want_text = hf_features(ref.get_text_features(torch.from_numpy(ids[:4].astype(np.int64))))
    want_scores = 100 * np.maximum(np.sum(want * want_text, axis=-1), 0)
    got_scores = scorer.pair_scores(images, texts[:4])
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-4, atol=1e-3)
    assert scorer.clip_score(list(images), texts[:4]) == pytest.approx(want_scores.mean(), abs=1e-3)


def torch_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch's antialiased bicubic on uint8, the kernel HF's default (torchvision) CLIP image
    processor runs on CPU, independent of which backend transformers picks."""
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    x = torch.nn.functional.interpolate(
        x, size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )
    return x[0].numpy().transpose(1, 2, 0)


def test_preprocessing_matches_image_processor(tmp_path):
    size = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    rng = np.random.default_rng(1)
    smooth = np.cumsum(rng.integers(-12, 13, size=(45, 70, 3)), axis=1)
    images = [
        np.clip(128 + smooth, 0, 255).astype(np.uint8),  # wide, downscaled to 32 x 49
        rng.integers(0, 256, size=(27, 20, 3), dtype=np.uint8),  # tall, upscaled to 43 x 32
    ]
    transformers.CLIPImageProcessor(**size).save_pretrained(tmp_path)
    ours = clip_lib.read_preprocess(tmp_path, image_size=32)
    assert (ours.shortest_edge, ours.crop) == (32, (32, 32))
    mean, std = np.float32(clip_lib.CLIP_MEAN), np.float32(clip_lib.CLIP_STD)
    level = 1.01 / 255 / std.min()  # one step of 255 after normalisation
    pil_backend = getattr(transformers, "CLIPImageProcessorPil", None)  # transformers >= 5
    for image, resized in zip(images, [(32, 49), (43, 32)], strict=True):
        got = ours(image)[0]
        assert got.shape == (32, 32, 3) and got.dtype == np.float32
        np.testing.assert_allclose(ours(Image.fromarray(image))[0], got)
        # HF's default processor (the torchvision backend, or PIL where torchvision is missing).
        want = transformers.CLIPImageProcessor(**size)(image, return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(got, want[0].transpose(1, 2, 0), atol=level)
        if pil_backend is not None:  # the PIL backend, which we follow exactly
            want = pil_backend(**size)(image, return_tensors="np")["pixel_values"]
            np.testing.assert_allclose(got, want[0].transpose(1, 2, 0), atol=1e-5)
        x = torch_bicubic(image, *resized)
        top, left = (resized[0] - 32) // 2, (resized[1] - 32) // 2
        want = (x[top : top + 32, left : left + 32] / np.float32(255) - mean) / std
        np.testing.assert_allclose(got, want, atol=level)
        assert np.mean(np.abs(got - want) > 1e-5) < 0.25  # mostly exact, some pixels a level off


def test_weights_must_match_the_architecture(tmp_path, tokenizer_dir):
    reference_clip(tmp_path, tokenizer_dir, act="quick_gelu", legacy_eos=False)
    file = tmp_path / clip_lib.WEIGHTS
    tensors = load_file(str(file))
    good = dict(tensors)

    del tensors["text_model.encoder.layers.1.mlp.fc2.bias"]
    save_file(tensors, str(file))
    with pytest.raises(
        ValueError, match=r"missing: text_model\.encoder\.layers\.1\.mlp\.fc2\.bias"
    ):
        clip_lib.load_clip(tmp_path)

    tensors = dict(good, extra_head=np.zeros(3, np.float32))
    tensors["text_model.embeddings.position_ids"] = np.arange(77)[None]  # a known buffer: fine
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=rf"{file}.*unexpected: extra_head") as error:
        clip_lib.load_clip(tmp_path)
    assert "position_ids" not in str(error.value)

    tensors = dict(good)
    tensors["visual_projection.weight"] = tensors["visual_projection.weight"].T.copy()
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=r"misshapen: visual_projection\.weight \(32, 16\)"):
        clip_lib.load_clip(tmp_path)


def test_missing_weights_name_the_flag(tmp_path):
    for path in (tmp_path / "absent", tmp_path, None):
        with pytest.raises(FileNotFoundError, match="--clip_weights") as error:
            clip_lib.load_clip(path)
        assert "openai/clip-vit-large-patch14" in str(error.value)
