"""The class-caption check (experiments/class_captions.py): its ImageFolder reads back through the
project's source, captions map to the class they name, the judge of drawn images judges real
ones, and the likelihood ranking picks the caption its scores favour; a micro run end to end."""

import json
import re

import numpy as np
import pytest
from flax import nnx

from experiments import class_captions as cc
from tests.helpers import ROOT, small_eval_config
from transfusion_jax.data.images import load_image
from transfusion_jax.data.sources import ImageFolderSource
from transfusion_jax.evaluation.evaluator import Evaluator
from transfusion_jax.evaluation.heldout import Example
from transfusion_jax.evaluation.suites import caption_nll
from transfusion_jax.model import Transfusion

NPZ = ROOT.parent / "shared" / "data" / "fashion_mnist.npz"
needs_data = pytest.mark.skipif(not NPZ.is_file(), reason=f"{NPZ} is absent")
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]  # fmt: skip


@pytest.fixture(scope="module")
def data():
    if not NPZ.is_file():
        pytest.skip(f"{NPZ} is absent")
    return dict(np.load(NPZ, allow_pickle=False))


@pytest.fixture(scope="module")
def evaluator():
    cfg = small_eval_config(batch_size=4)
    return Evaluator(cfg, Transfusion(cfg, nnx.Rngs(0)))


@needs_data
def test_image_folder_reads_back_with_its_captions(data, tmp_path):
    rows = cc.write_image_folder(data, tmp_path, per_class=3)
    source = ImageFolderSource(tmp_path)
    assert rows == len(source) == 30 and source.skipped == 0
    names = [str(n) for n in data["class_names"]]
    seen = set()
    for i in range(len(source)):
        record = source[i]
        label, index = map(int, re.search(r"(\d+)_(\d+)\.png$", record["image"]).groups())
        assert data["y_train"][index] == label
        assert record["text"] == f"a photo of a {names[label].lower()}"
        pixels = load_image(record["image"], 28)  # as written: greyscale in RGB
        expected = data["x_train"][index].astype(np.float32) / 127.5 - 1.0
        np.testing.assert_allclose(pixels, np.repeat(expected[..., None], 3, -1), atol=1e-6)
        seen.add(label)
    assert seen == set(range(10))
    assert cc.write_image_folder(data, tmp_path, per_class=3) == 30  # kept, not rewritten
    with pytest.raises(SystemExit, match="--per_class"):
        cc.write_image_folder(data, tmp_path, per_class=4)


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a photo of a trouser", "Trouser"),
        ("A Photo of a TROUSER.", "Trouser"),
        ("a photo of a t-shirt/top", "T-shirt/top"),
        ("a photo of a T-Shirt / Top", "T-shirt/top"),  # not "Shirt": inside the longer match
        ("a photo of a shirt", "Shirt"),
        ("a photo of a ankle boot", "Ankle boot"),
        ("a photo of a sneakerbag", None),  # whole words only
        ("a photo of a trousers", None),
        ("a photo of a", None),
        ("", None),
        ("a photo of a bag and a coat", None),  # two classes
        ("a bag, a bag", "Bag"),
    ],
)
def test_named_class(caption, expected):
    got = cc.named_class(caption, FASHION)
    assert (None if got is None else FASHION[got]) == expected


def test_named_class_prefers_the_longest_match():
    names = ["boot", "ankle boot", "coat"]
    assert cc.named_class("an ankle boot", names) == 1
    assert cc.named_class("a boot", names) == 0
    assert cc.named_class("a photo of a coat", names) == 2
    assert cc.named_class("an ankle boot and a boot", names) is None  # both named


def test_histogram_counts_every_class_and_none():
    assert cc.histogram([0, 2, None, 2], ["a", "b", "c"]) == {"a": 1, "b": 0, "c": 2, "none": 1}


def test_stratified_takes_classes_in_turn():
    labels = np.array([2, 0, 1, 0, 2, 1, 1, 0, 2])
    chosen = cc.stratified(labels, 5, 3)
    assert labels[chosen].tolist() == [0, 1, 2, 0, 1]
    assert chosen.tolist() == [1, 2, 0, 3, 5]


@needs_data
def test_classifier_judges_real_images(data):
    train = cc.model_pixels(data["x_train"][:2000], 16)
    params = cc.train_classifier(train, data["y_train"][:2000], steps=200)
    test = cc.model_pixels(data["x_test"][:400], 16)
    accuracy = (cc.classify(params, test) == data["y_test"][:400]).mean()
    assert accuracy > 0.7
    uint8 = np.round((test + 1) * 127.5).astype(np.uint8)  # as drawn images come
    assert (cc.classify(params, uint8) == cc.classify(params, test)).mean() > 0.99


def test_likelihood_ranking_picks_the_caption_the_scores_favour(evaluator):
    ev = evaluator
    truth = np.array([3, 1, 4, 1, 5, 9, 2])  # 70 rows: batches of 4, the last one padded
    pictures = np.stack([np.full((16, 16, 3), k / 10 - 0.45, np.float32) for k in truth])
    captions = [f"item {k}" for k in range(10)]

    def stub(batch):
        """Log-likelihood -(caption's number - picture's number)^2; 0 for padding rows."""
        scores = []
        rows = zip(np.asarray(batch.tokens), np.asarray(batch.latents), strict=True)
        for tokens, latents in rows:
            found = re.search(r"item (\d)", ev.tokenizer.decode([t for t in tokens if t > 4]))
            if not found:
                scores.append(0.0)
                continue
            shown = round((latents[0].mean() + 0.45) * 10)
            scores.append(-float((int(found.group(1)) - shown) ** 2))
        return np.array(scores)

    table = cc.caption_log_likelihoods(ev, pictures, captions, row_score=stub)
    assert table.shape == (7, 10)
    assert table.argmax(-1).tolist() == truth.tolist()
    assert table[0, 3] == 0 and table[0, 5] == -4


def test_row_scores_are_the_captions_suites_likelihood(evaluator):
    ev = evaluator
    rng = np.random.default_rng(0)
    pictures = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    captions = ["a photo of a coat", "a photo of a bag"]
    table = cc.caption_log_likelihoods(ev, pictures, captions)
    lengths = [len(ev.tokenizer.encode(c)) for c in captions]
    for n in range(2):
        for k in range(2):
            own, _ = caption_nll(ev, [Example(pictures[n], [captions[k]])])
            assert table[n, k] == pytest.approx(-own * (lengths[k] + 1), rel=1e-4)
    # the suite's image_information: after the next picture minus after the own, per token
    labels = np.array([0, 1])
    own, other = caption_nll(ev, [Example(pictures[n], [captions[n]]) for n in range(2)])
    assert cc.image_information(table, labels, lengths) == pytest.approx(other - own, abs=1e-4)


@pytest.mark.slow
def test_micro_run_end_to_end(data, tmp_path, capsys, monkeypatch):
    argv = ["--out", str(tmp_path), "--steps", "2", "--num", "10", "--per_class", "10"]
    argv += ["--sampling_steps", "3", "--classifier_images", "2000"]
    argv += ["--set", "train.eval_every=0", "--set", "train.log_every=1"]
    report = cc.main(argv)
    lines = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert "image_information" in lines
    for key in ("classifier_accuracy", "generation_accuracy", "caption_accuracy",
                "caption_names_a_class", "likelihood_accuracy"):  # fmt: skip
        assert key in lines and 0 <= report[key] <= 1
    assert report["step"] == 2 and report["num"] == 10
    assert sum(report["caption_classes"].values()) == 10
    assert json.loads((tmp_path / "report.json").read_text())["step"] == 2
    assert len((tmp_path / "captions.txt").read_text().splitlines()) == 11
    assert (tmp_path / "drawn.png").stat().st_size > 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert "--config.data.source=imagefolder" in log

    class Scored(Exception):
        pass

    def scored(*args):  # the scoring is the first call's; only what comes before it is new
        raise Scored

    monkeypatch.setattr(cc, "score", scored)
    with pytest.raises(Scored):
        cc.main(argv)  # again: the folder is kept and training is skipped
    assert (tmp_path / "run" / "train.log").read_text() == log
