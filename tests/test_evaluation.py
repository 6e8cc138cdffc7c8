"""The evaluation suites against independent recomputations, on an untrained tiny model.

Training a model to a known quality is slow, so the suites' arithmetic is checked on a random
model against direct recomputations (numpy log-softmax of the plain forward pass, the diffusion
error recomputed from the model's prediction), and the shapes and captions suites against an
oracle that draws and writes the truth (and a perturbed one that does not).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import ROOT
from transfusion_jax.batch import build_batch, caption_first_document
from transfusion_jax.config import load_config, resolve_model
from transfusion_jax.data import shapes
from transfusion_jax.data.images import to_uint8
from transfusion_jax.data.pipeline import training_split
from transfusion_jax.data.sources import ImageFolderSource, TextSource
from transfusion_jax.data.split import held_out, split
from transfusion_jax.evaluation.evaluator import Evaluator
from transfusion_jax.evaluation.heldout import held_out_examples, held_out_texts
from transfusion_jax.evaluation.language import bits_per_byte, perplexity, text_windows
from transfusion_jax.model import Transfusion
from transfusion_jax.workdir import config_changes


def small_config(**eval_overrides):
    cfg = load_config(str(ROOT / "configs" / "tiny.py"))
    cfg.model.update(d_model=64, depth=2, num_heads=2)
    cfg.data.update(image_size=16, seq_len=96)
    cfg.image.update(patch_size=4)
    cfg.patch.kind = "linear"
    cfg.eval.update(num_examples=6, batch_size=4, sampling_steps=3, **eval_overrides)
    return resolve_model(cfg)


@pytest.fixture(scope="module")
def evaluator():
    cfg = small_config()
    return Evaluator(cfg, Transfusion(cfg, nnx.Rngs(0)))


# -- language metrics ------------------------------------------------------------------------------


def test_perplexity_and_bits_per_byte_by_hand():
    # Two tokens, each with probability 1/4: nll = 2 ln 4, perplexity 4; over 4 bytes 1 bit/byte.
    nll = 2 * math.log(4)
    assert perplexity(nll, 2) == pytest.approx(4.0)
    assert bits_per_byte(nll, 4) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


def test_text_windows_score_every_token_once_with_its_row_as_context():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(10, 50, size=n)) for n in (1, 5, 7, 8, 20)]
    seq_len, bos = 8, 1
    rows, weights = text_windows(docs, seq_len, bos, pad=0)
    scored = []  # (the context tokens, the target) of every weighted position
    for row, w in zip(rows, weights, strict=True):
        for p in np.flatnonzero(w):
            scored.append((tuple(row[: p + 1]), row[p + 1]))
    expected = []  # brute force: each document's targets, in order, each once
    for doc in docs:
        seq = [bos, *doc]
        for k in range(1, len(seq)):
            expected.append(seq[k])
    assert [t for _, t in scored] == expected
    # each context ends with the token before its target, and a row never exceeds seq_len
    for context, _ in scored:
        assert len(context) <= seq_len - 1


# -- the suites against recomputations --------------------------------------------------------


def test_text_suite_equals_a_numpy_recomputation(evaluator):
    ev = evaluator
    texts, _ = held_out_texts(ev.cfg, ev.settings.num_examples)
    got = ev.run(["text"])
    total, tokens = 0.0, 0
    model, special = ev.model, ev.tokenizer.special
    for text in texts:
        ids = [special.bos, *ev.tokenizer.encode(text)]
        batch = build_batch([[[ids]]], len(ids), 2, (16, 16, 3), 4, special)
        batch = jax.tree.map(jnp.asarray, batch)
        logits, _ = model(batch, batch.latents, jnp.zeros((1, 2), jnp.int32))
        logp = np.asarray(jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1))
        total -= sum(logp[p, ids[p + 1]] for p in range(len(ids) - 1))
        tokens += len(ids) - 1
    num_bytes = sum(len(t.encode()) for t in texts)
    assert got["text/tokens"] == tokens
    assert got["text/perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-4)
    assert got["text/bits_per_byte"] == pytest.approx(total / math.log(2) / num_bytes, rel=1e-4)


def test_diffusion_suite_equals_the_error_recomputed_from_the_prediction(evaluator):
    ev = evaluator
    got = ev.run(["diffusion"])
    levels = [int(f * 1000) for f in ev.settings.diffusion_levels]
    assert set(got) >= {f"diffusion/val_loss_t{t}" for t in levels} | {"diffusion/val_loss"}
    assert got["diffusion/val_loss"] == pytest.approx(
        np.mean([got[f"diffusion/val_loss_t{t}"] for t in levels])
    )
    # The first example at the middle level, recomputed: its noise is the suite's draw.
    examples = held_out_examples(ev.cfg, ev.settings.num_examples)
    j = len(levels) // 2
    t = levels[j]
    key = jax.random.key(ev.settings.seed)
    noise = np.asarray(jax.random.normal(key, (len(examples), len(levels), 2, 16, 16, 3)))
    abar = ev.diffusion.alphas_cumprod[t]
    errors = []
    for i, example in enumerate(examples):
        caption = ev.tokenizer.encode(example.captions[0])
        doc = caption_first_document(caption, example.image, ev.tokenizer.special)
        batch = jax.tree.map(jnp.asarray, build_batch([[doc]], 96, 2, (16, 16, 3), 4))
        eps = noise[i, j, 0]
        noisy = np.sqrt(abar) * example.image + np.sqrt(1 - abar) * eps
        latents = batch.latents.at[0, 0].set(noisy)
        _, prediction = ev.model(batch, latents, jnp.full((1, 2), t, jnp.int32))
        errors.append(np.mean((np.asarray(prediction[0, 0], np.float64) - eps) ** 2))
    assert got[f"diffusion/val_loss_t{t}"] == pytest.approx(np.mean(errors), rel=1e-4)


class Oracle:
    """Draws exactly the scene a prompt states and writes exactly the scene a picture shows;
    `wrong` swaps every colour for the next one of the palette."""

    def __init__(self, size: int, wrong: bool = False):
        self.size, self.wrong = size, wrong

    def _scene(self, scene):
        if not self.wrong:
            return scene
        colors = list(shapes.COLORS)
        objects = tuple(
            shapes.ShapeObject(colors[(colors.index(o.color) + 1) % 5], o.shape, o.size)
            for o in scene.objects
        )
        return shapes.Scene(objects, scene.relation)

    def text_to_image(self, prompts, **kw):
        return [shapes.render(self._scene(shapes.parse_caption(p)), self.size) for p in prompts]

    def caption(self, pictures, **kw):
        return [shapes.caption(self._scene(shapes.read_scene(to_uint8(p)))) for p in pictures]


@pytest.mark.parametrize("wrong", [False, True])
def test_shapes_and_captions_suites_score_an_oracle(evaluator, monkeypatch, wrong):
    ev = evaluator
    monkeypatch.setattr(ev, "pipeline", Oracle(16, wrong))
    got = ev.run(["shapes", "captions"])
    for task in ("text_to_image", "captioning"):
        assert got[f"shapes/{task}_accuracy"] == (0.0 if wrong else 1.0)
        assert got[f"shapes/{task}_count"] == 1.0 and got[f"shapes/{task}_shapes"] == 1.0
        assert got[f"shapes/{task}_colors"] == (0.0 if wrong else 1.0)
    assert got["shapes/captioning_parsed"] == 1.0
    if wrong:
        assert got["captions/cider"] < 5.0
    else:  # CIDEr-D of candidates equal to their only reference: 10 times the mean of n = 1..4
        assert got["captions/cider"] > 5.0
    art = ev.artifacts["shapes"]
    assert len(art["drawn"]) == len(art["captions"]) == ev.settings.num_examples


# -- the held-out split ------------------------------------------------------------------------


def write_folder(root, n=200):
    from PIL import Image

    root.mkdir()
    rows = []
    for i in range(n):
        name = f"img_{i:04d}.png"
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(root / name)
        rows += [f'{{"file_name": "{name}", "text": "caption {i} {k}"}}' for k in range(2)]
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def test_training_never_sees_the_held_out_split(tmp_path):
    write_folder(tmp_path / "folder")
    source = ImageFolderSource(tmp_path / "folder")
    train = training_split(source, 10.0, "data.path")
    held = split(source, 10.0, held=True)
    train_files = {train[i]["image"] for i in range(len(train))}
    held_files = {held[i]["image"] for i in range(len(held))}
    assert train_files and held_files and not train_files & held_files
    assert len(train) + len(held) == len(source)
    assert 5 <= len({f for f in held_files}) <= 40  # about 10% of 200 images
    # both captions of a held-out image are held out together
    assert len(held) == 2 * len(held_files)
    # the split depends on file names only: another folder with the same names splits the same
    assert all(held_out(f, 10.0) for f in held_files)

    cfg = small_config()
    cfg.data.update(source="imagefolder", path=str(tmp_path / "folder"), held_out_percent=10.0)
    examples = held_out_examples(cfg, 1000)
    assert len(examples) == len(held_files)
    assert all(len(x.captions) == 2 for x in examples)  # every caption of the image


def test_text_held_out_split_and_an_explicit_file(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"paragraph number {i}" for i in range(300)))
    cfg = small_config()
    cfg.data.text_path = str(corpus)
    texts, where = held_out_texts(cfg, 1000)
    train = training_split(TextSource(corpus), cfg.data.held_out_percent, "data.text_path")
    train_texts = {train[i]["text"] for i in range(len(train))}
    assert "held-out split" in where and texts and not set(texts) & train_texts
    cfg.eval.text_path = str(corpus)  # a file the user holds out: all of it
    texts, where = held_out_texts(cfg, 1000)
    assert len(texts) == 300 and where == str(corpus)


def test_old_runs_without_a_held_out_split_are_not_resumed_silently():
    saved = {"data": {"source": "imagefolder"}}
    changes = config_changes(saved, {"data": {"source": "imagefolder", "held_out_percent": 5.0}})
    assert "data.held_out_percent" in changes.refused
    same = config_changes(saved, {"data": {"source": "imagefolder", "held_out_percent": 0.0}})
    assert not same.refused
    # the shapes data holds nothing out: its old runs resume as they were
    shapes_run = {"data": {"source": "shapes", "text_path": ""}}
    new = {"data": {"source": "shapes", "text_path": "", "held_out_percent": 5.0}}
    assert not config_changes(shapes_run, new).refused
