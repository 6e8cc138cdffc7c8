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

from tests.helpers import small_eval_config
from transfusion_jax.batch import build_batch, caption_first_document
from transfusion_jax.data import shapes
from transfusion_jax.data.images import to_uint8
from transfusion_jax.data.pipeline import training_split
from transfusion_jax.data.sources import ImageFolderSource, TextSource
from transfusion_jax.data.split import held_out, split
from transfusion_jax.evaluation.evaluator import Evaluator
from transfusion_jax.evaluation.heldout import HELD_OUT_SEED, held_out_examples, held_out_texts
from transfusion_jax.evaluation.language import bits_per_byte, perplexity, text_windows
from transfusion_jax.model import Transfusion
from transfusion_jax.quickstart import object_count_summary
from transfusion_jax.workdir import config_changes


def small_config(**eval_overrides):
    sizes = dict(num_examples=6, batch_size=4, sampling_steps=3)
    return small_eval_config(**(sizes | eval_overrides))


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


def test_text_windows_score_every_token_once_with_half_a_row_of_context():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(10, 50, size=n)) for n in (1, 5, 7, 8, 20, 41)]
    seq_len, bos = 8, 1
    rows, weights, lengths = text_windows(docs, seq_len, bos, pad=0)
    scored = []  # (the context tokens, the target) of every weighted position
    for row, w, n in zip(rows, weights, lengths, strict=True):
        assert (row[n:] == 0).all() and not w[n - 1 :].any()  # nothing scored past the row
        for p in np.flatnonzero(w):
            scored.append((tuple(row[: p + 1]), row[p + 1]))
    expected = []  # brute force: each document's targets, in order, each once, with the
    for doc in docs:  # tokens before it in the document as context (all, or the last 4 or more)
        seq = [bos, *doc]
        expected += [(tuple(seq[:k]), seq[k]) for k in range(1, len(seq))]
    assert [t for _, t in scored] == [t for _, t in expected]
    for (context, _), (full, _) in zip(scored, expected, strict=True):
        assert full[len(full) - len(context) :] == context  # the context is what preceded it
        assert len(context) == len(full) or len(context) >= seq_len // 2


# -- the suites against recomputations --------------------------------------------------------


def log_probs(model, special, tokens) -> np.ndarray:
    """float64 [len, V] log-probabilities of the next token after each of `tokens` (one document
    of one row), from the plain forward pass and a numpy log-softmax."""
    batch = build_batch([[[list(tokens)]]], len(tokens), 2, (16, 16, 3), 4, special)
    batch = jax.tree.map(jnp.asarray, batch)
    logits, _ = model(batch, batch.latents, jnp.zeros((1, 2), jnp.int32))
    logits = np.asarray(logits[0], np.float64)
    return (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )


def test_text_suite_equals_a_numpy_recomputation(evaluator):
    ev = evaluator
    texts, _ = held_out_texts(ev.cfg, ev.settings.num_examples)
    got = ev.run(["text"])
    total, tokens = 0.0, 0
    special = ev.tokenizer.special
    for text in texts:  # captions: each fits a row, so every target sees all before it
        seq = [special.bos, *ev.tokenizer.encode(text)]
        logp = log_probs(ev.model, special, seq)
        total -= sum(logp[k - 1, seq[k]] for k in range(1, len(seq)))
        tokens += len(seq) - 1
    num_bytes = sum(len(t.encode()) for t in texts)
    assert got["text/tokens"] == tokens
    assert got["text/perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-4)
    assert got["text/bits_per_byte"] == pytest.approx(total / math.log(2) / num_bytes, rel=1e-4)


def test_text_suite_scores_documents_longer_than_a_row(tmp_path):
    """Two paragraphs of 60 and 130 bytes in rows of 48: strided windows, half a row of context."""
    corpus = tmp_path / "held_out.txt"
    texts = ["the quick brown fox jumps over the lazy dog; " * 3, "abc defg " * 14]
    corpus.write_text("\n\n".join(t.strip() for t in texts))
    cfg = small_config(text_path=str(corpus), batch_size=3)
    cfg.data.seq_len = 48
    ev = Evaluator(cfg, Transfusion(cfg, nnx.Rngs(1)))
    got = ev.run(["text"])
    total = tokens = 0
    for text in (t.strip() for t in texts):
        ids = ev.tokenizer.encode(text)
        assert len(ids) > 48  # longer than a row
        total += reference_nll_strided(ev.model, ev.tokenizer.special, ids, 48)
        tokens += len(ids)
    assert got["text/tokens"] == tokens
    assert got["text/nll_per_token"] == pytest.approx(total / tokens, rel=1e-4)


def reference_nll_strided(model, special, ids, seq_len: int) -> float:
    """The strided windows written out: the first seq_len - 1 targets see everything before them;
    after that, window starts move by seq_len / 2 and each new target sees its window."""
    seq, total, start, scored = [special.bos, *ids], 0.0, 0, 1
    while scored < len(seq):
        stop = min(start + seq_len, len(seq))
        logp = log_probs(model, special, seq[start:stop])
        total -= sum(logp[k - start - 1, seq[k]] for k in range(scored, stop))
        scored, start = stop, stop - seq_len // 2
    return total


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
    abar = ev.diffusion.alphas_cumprod[t]
    errors = []
    for i, example in enumerate(examples):
        caption = ev.tokenizer.encode(example.captions[0])
        doc = caption_first_document(caption, example.image, ev.tokenizer.special)
        batch = jax.tree.map(jnp.asarray, build_batch([[doc]], 96, 2, (16, 16, 3), 4))
        eps = np.asarray(
            jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), j), (16, 16, 3))
        )
        noisy = np.sqrt(abar) * example.image + np.sqrt(1 - abar) * eps
        latents = batch.latents.at[0, 0].set(noisy)
        _, prediction = ev.model(batch, latents, jnp.full((1, 2), t, jnp.int32))
        errors.append(np.mean((np.asarray(prediction[0, 0], np.float64) - eps) ** 2))
    assert got[f"diffusion/val_loss_t{t}"] == pytest.approx(np.mean(errors), rel=1e-4)


class Oracle:
    """Draws exactly the scene a prompt states and writes exactly the scene a picture shows,
    except in scenes with a number of objects in `wrong_for`: there it swaps every colour for the
    next one of the palette."""

    def __init__(self, size: int, wrong_for: tuple[int, ...] = ()):
        self.size, self.wrong_for = size, wrong_for

    def _scene(self, scene):
        if len(scene.objects) not in self.wrong_for:
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
    monkeypatch.setattr(ev, "pipeline", Oracle(16, (1, 2) if wrong else ()))
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


def test_shapes_suite_scores_one_and_two_object_scenes_apart(evaluator, monkeypatch):
    ev = evaluator
    monkeypatch.setitem(ev.settings, "num_examples", 16)  # both kinds in each task
    monkeypatch.setattr(ev, "pipeline", Oracle(16, wrong_for=(2,)))
    got = ev.run(["shapes"])
    drawn = [shapes.scene_for_index(i, HELD_OUT_SEED) for i in range(16)]
    captioned = [shapes.scene_for_index(i, HELD_OUT_SEED + 1) for i in range(16)]
    for task, scenes in (("text_to_image", drawn), ("captioning", captioned)):
        singles = sum(len(x.objects) == 1 for x in scenes)
        assert 0 < singles < 16
        assert got[f"shapes/{task}_accuracy_one_object"] == 1.0
        assert got[f"shapes/{task}_accuracy_two_objects"] == 0.0
        assert got[f"shapes/{task}_accuracy"] == pytest.approx(singles / 16)


def test_quickstart_prints_one_and_two_object_scenes_apart():
    rates = {"captioning_accuracy_one_object": 0.5, "captioning_accuracy_two_objects": 0.25}
    report = {"by_object_count": rates | {"text_to_image_accuracy_two_objects": 0.0}}
    assert object_count_summary(report, "captioning") == " (one object: 50%, two objects: 25%)"
    assert object_count_summary(report, "text_to_image") == " (two objects: 0%)"
    assert object_count_summary({"by_object_count": {}}, "captioning") == ""


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
    assert "held-out 5.0%" in where and texts and not set(texts) & train_texts
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


def test_a_validation_folder_is_read_whole_and_a_cache_remembers_its_split(tmp_path):
    from transfusion_jax.data.cache import write_cache, write_split_record
    from transfusion_jax.data.sources import CachedSource
    from transfusion_jax.evaluation.heldout import image_records

    write_folder(tmp_path / "folder", n=60)
    cfg = small_config()
    cfg.eval.data_path = str(tmp_path / "folder")
    records, where = image_records(cfg)
    assert len(records) == 120 and "all of it" in where

    # a cache holds the training split only, and says which split it left out
    cfg = small_config()
    cfg.data.update(source="imagefolder", path=str(tmp_path / "folder"), held_out_percent=20.0)
    source = ImageFolderSource(tmp_path / "folder")
    train = training_split(source, 20.0, "data.path")
    cache = tmp_path / "latents.array_record"
    written, _ = write_cache(train, 16, cache)
    write_split_record(cache, cfg)
    assert written == len(train) == len(CachedSource(cache)) < len(source)
    cached = small_config()
    cached.data.update(source="cached", path=str(cache), held_out_percent=5.0)
    records, where = image_records(cached)  # the cache's 20%, not the run's 5%
    assert len(records) == len(source) - len(train) and "20.0%" in where
    (tmp_path / "latents.array_record.split.json").unlink()
    with pytest.raises(ValueError, match="written before held-out splits.*--data_path"):
        image_records(cached)


def test_runs_that_held_nothing_out_are_refused_and_suites_without_data_named():
    from transfusion_jax.evaluation.heldout import image_records, why_not

    cfg = small_config()
    cfg.data.update(source="imagefolder", path="/nowhere", held_out_percent=0.0)
    with pytest.raises(ValueError, match="held nothing out.*--data_path"):
        image_records(cfg)
    assert "held_out_percent is 0" in why_not(cfg, "diffusion")
    cfg.data.update(source="synthetic", held_out_percent=5.0)
    assert "eval.data_path" in why_not(cfg, "captions")
    assert "eval.text_path" in why_not(cfg, "text")
    cfg.eval.update(text_path="held.txt", data_path="folder")
    assert why_not(cfg, "text") is None and why_not(cfg, "diffusion") is None
    assert why_not(small_config(), "diffusion") is None  # shapes: scenes of other seeds


def test_an_old_run_is_read_with_the_split_it_trained_with():
    from transfusion_jax.config import base_config
    from transfusion_jax.workdir import fill_legacy

    stored = {"data": {"source": "imagefolder", "path": "x"}}  # saved before held-out splits
    cfg = base_config()
    cfg.update(stored)
    fill_legacy(cfg, stored)
    assert cfg.data.held_out_percent == 0.0
    cfg = base_config()
    cfg.update({"data": {"source": "shapes"}})
    fill_legacy(cfg, {"data": {"source": "shapes"}})
    assert cfg.data.held_out_percent == 5.0


def test_caption_likelihood_after_own_and_other_images_equals_a_recomputation(evaluator):
    from transfusion_jax.batch import image_first_document
    from transfusion_jax.evaluation.suites import caption_nll

    ev = evaluator
    examples = ev.examples()[:3]
    own, other = caption_nll(ev, examples)
    special = ev.tokenizer.special
    totals = []
    for shift in (0, 1):
        total = count = 0.0
        for k, example in enumerate(examples):
            image = examples[(k + shift) % len(examples)].image
            caption = ev.tokenizer.encode(example.captions[0])
            doc = image_first_document(image, caption, special)
            batch = jax.tree.map(jnp.asarray, build_batch([[doc]], 96, 2, (16, 16, 3), 4, special))
            # clean image at t = 0, as the suite (and the loss at t = 0) feeds it
            a = np.sqrt(ev.diffusion.alphas_cumprod[0])
            logits, _ = ev.model(batch, batch.latents * a, jnp.zeros((1, 2), jnp.int32))
            logits = np.asarray(logits[0], np.float64)
            logp = logits - logits.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            eoi = int(np.flatnonzero(np.asarray(batch.tokens[0]) == special.eoi)[0])
            targets = [*caption, special.eos]  # predicted from EOI and each caption token
            total -= sum(logp[eoi + i, t] for i, t in enumerate(targets))
            count += len(targets)
        totals.append(total / count)
    assert own == pytest.approx(totals[0], rel=1e-4)
    assert other == pytest.approx(totals[1], rel=1e-4)
