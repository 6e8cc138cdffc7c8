"""experiments/best_of_n.py: its rates against a brute-force count, its tries against a pipeline
that draws exactly only from the second try on, and the paired likelihoods against the product
table's diagonal."""

import numpy as np
import pytest
from flax import nnx

from experiments import best_of_n as bon
from experiments import class_captions as cc
from tests.helpers import small_eval_config
from transfusion_jax.data import shapes
from transfusion_jax.evaluation.evaluator import Evaluator
from transfusion_jax.model import Transfusion


@pytest.fixture(scope="module")
def evaluator():
    cfg = small_eval_config(batch_size=4, sampling_steps=2)
    return Evaluator(cfg, Transfusion(cfg, nnx.Rngs(0)))


def test_first_n_rates_count_what_the_first_n_tries_hold():
    rng = np.random.default_rng(0)
    exact = rng.random((5, 40)) < 0.3
    scores = rng.integers(0, 3, (5, 40)).astype(float)  # ties: the earliest try counts
    rates = bon.first_n_rates(exact, scores)
    for n in range(1, 6):
        reached = picked = 0
        for c in range(40):
            reached += any(exact[k, c] for k in range(n))
            best = max(range(n), key=lambda k: (scores[k, c], -k))
            picked += exact[best, c]
        assert rates["any"][n - 1] == pytest.approx(reached / 40)
        assert rates["picked"][n - 1] == pytest.approx(picked / 40)


def _prompts(num):
    from transfusion_jax.evaluation.heldout import HELD_OUT_SEED

    return [shapes.caption(shapes.scene_for_index(i, HELD_OUT_SEED)) for i in range(num)]


class LateOracle:
    """Draws a blank canvas on the evaluation's first seeds, the prompt's exact scene after."""

    def text_to_image(self, prompts, seed=0, **kw):
        if seed < 1000:
            return [np.full((16, 16, 3), 255, np.uint8) for _ in prompts]
        return [shapes.render(shapes.parse_caption(p), 16) for p in prompts]


def test_tries_use_new_seeds_and_score_every_drawing(evaluator, monkeypatch):
    ev = evaluator
    monkeypatch.setattr(ev, "pipeline", LateOracle())
    seed = ev.settings.seed
    report, picked = bon.run(ev, num=6, tries=3)
    assert ev.settings.seed == seed
    assert report["all"]["any"] == [0.0, 1.0, 1.0]
    assert report["exact_per_try"] == [0.0, 1.0, 1.0]
    assert report["all"]["picked"][0] == 0.0 and picked.shape == (6, 16, 16, 3)
    singles = sum(len(shapes.parse_caption(p).objects) == 1 for p in _prompts(6))
    assert report["one_object_scenes"] == singles and 0 < singles < 6
    for kind in ("one_object", "two_objects"):
        assert report[kind]["any"] == [0.0, 1.0, 1.0]
        assert report[kind]["aspects"]["correct"] == pytest.approx(2 / 3)
        assert report[kind]["aspects"]["colors"] == pytest.approx(2 / 3)  # a blank has none
    assert len(bon.table(report).splitlines()) == 2 + 3 + 2


def test_paired_likelihoods_are_the_product_tables_diagonal(evaluator):
    ev = evaluator
    rng = np.random.default_rng(1)
    pictures = rng.uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    captions = ["a small red circle", "a large blue square", "a small green triangle"]
    table = cc.caption_log_likelihoods(ev, pictures, captions)
    paired = cc.paired_log_likelihoods(ev, pictures, captions)
    np.testing.assert_allclose(paired, np.diag(table), rtol=1e-5)
    assert len(set(np.round(table.ravel(), 3))) > 3  # the scores depend on picture and caption
