"""experiments/word_reliance.py: swapped captions change exactly one attribute, the enumerated
placements are exactly the data's, the exact denoiser against a direct Bayes recomputation, and
the run's true-caption losses are the diffusion suite's."""

import dataclasses

import numpy as np
import pytest
from scipy import special

from experiments import word_reliance as wr
from transfusion_jax.data import shapes


@pytest.mark.parametrize("attribute", ["color", "shape", "size"])
def test_a_swap_changes_that_attribute_of_every_object_and_nothing_else(attribute):
    rng = np.random.default_rng(0)
    swapped = 0
    for i in range(300):
        scene = shapes.scene_for_index(i)
        text = wr.swapped_caption(shapes.caption(scene), attribute, rng)
        if text is None:  # only when the swap would make the two objects the same
            continue
        swapped += 1
        other = shapes.parse_caption(text)
        assert other.relation == scene.relation and len(other.objects) == len(scene.objects)
        for mine, theirs in zip(scene.objects, other.objects, strict=True):
            assert getattr(mine, attribute) != getattr(theirs, attribute)
            kept = {a: getattr(theirs, a) for a in shapes.ATTRIBUTES if a != attribute}
            assert dataclasses.replace(mine, **kept) == mine
    assert swapped > 250


@pytest.mark.parametrize("attribute", ["color", "shape", "size"])
def test_an_exchange_binds_the_same_words_the_other_way(attribute):
    exchanged = 0
    for i in range(300):
        scene = shapes.scene_for_index(i)
        text = wr.exchanged_caption(shapes.caption(scene), attribute)
        objects = scene.objects
        if len(objects) == 1 or getattr(objects[0], attribute) == getattr(objects[1], attribute):
            assert text is None
            continue
        exchanged += 1
        other = shapes.parse_caption(text)
        assert other.relation == scene.relation
        assert sorted(text.split()) == sorted(shapes.caption(scene).split())  # the same words
        for mine, theirs, partner in zip(objects, other.objects, objects[::-1], strict=True):
            assert getattr(theirs, attribute) == getattr(partner, attribute)
            kept = {a: getattr(theirs, a) for a in shapes.ATTRIBUTES if a != attribute}
            assert dataclasses.replace(mine, **kept) == mine
    assert exchanged > 100


def test_the_enumerated_placements_are_exactly_the_pictures_the_data_draws():
    n = 16
    data = shapes.ShapesDataset(n, seed=3)
    singles = [data[i] for i in range(400)]
    singles = [x for x in singles if len(shapes.parse_caption(x["text"]).objects) == 1]
    assert len(singles) > 60
    enumerated = {}
    for item in singles:
        obj = shapes.parse_caption(item["text"]).objects[0]
        pictures = enumerated.setdefault(obj, wr.placements(obj, n))
        side = round(shapes.SIZES[obj.size] * n)
        assert len(pictures) == (n - 2 - side + 1) ** 2  # margin 1 on each side
        assert len(np.unique(pictures, axis=0)) == len(pictures)  # placements are told apart
        drawn = item["image"].reshape(-1) / 127.5 - 1.0
        assert np.any(np.all(pictures == drawn, axis=1))


def test_the_posterior_mean_is_bayes_rule_over_objects_then_placements():
    rng = np.random.default_rng(1)
    objects = [shapes.ShapeObject("red", s, "small") for s in shapes.SHAPES]
    candidates = [wr.placements(o, 16) for o in objects]
    x0 = candidates[1][7]
    for sigma in (0.3, 0.7, 0.95):
        x_t = (1 - sigma) * x0 + sigma * rng.normal(size=x0.shape)
        # Direct: p(object) = 1/3, p(placement | object) = 1/P, Gaussian likelihood.
        flat = np.concatenate(candidates)
        prior = np.concatenate([np.full(len(c), 1 / (3 * len(c))) for c in candidates])
        log_like = -((x_t - (1 - sigma) * flat) ** 2).sum(1) / (2 * sigma**2)
        weights = special.softmax(log_like + np.log(prior))
        np.testing.assert_allclose(
            wr.posterior_mean(x_t, sigma, candidates), weights @ flat, rtol=1e-9, atol=1e-12
        )
    # Nearly no noise: the true picture is identified.
    x_t = 0.999 * x0 + 0.001 * rng.normal(size=x0.shape)
    np.testing.assert_allclose(wr.posterior_mean(x_t, 0.001, candidates), x0, atol=1e-9)


def test_the_ideal_values_are_finite_and_full_knowledge_is_exact_at_low_noise():
    values = wr.ideal_word_values(16, num=4, seed=0)
    assert set(values) == {
        "full caption",
        "color unknown",
        "shape unknown",
        "size unknown",
        "no caption",
    }
    for losses in values.values():
        assert len(losses) == len(wr.LEVELS) and np.all(np.isfinite(losses))
    assert values["full caption"][0] < 1e-6  # sigma 0.05: every placement is told apart


def test_the_runs_true_caption_losses_are_the_diffusion_suites(tiny_shapes_run):
    from transfusion_jax.evaluation.evaluator import Evaluator
    from transfusion_jax.evaluation.suites import diffusion_suite
    from transfusion_jax.inference import load_trained

    ev = wr.load_run(tiny_shapes_run, num=8)
    result = wr.run_word_reliance(ev)
    model, cfg, step = load_trained(tiny_shapes_run)
    cfg.eval.num_examples = 8
    cfg.eval.diffusion_levels = wr.LEVELS
    suite = diffusion_suite(Evaluator(cfg, model, step=step))
    per_level = [suite[k] for k in suite if k.startswith("diffusion/val_loss_t")]
    np.testing.assert_allclose(result["true caption"], per_level, rtol=1e-6)
    assert set(result) == {
        "true caption",
        "color swapped",
        "shape swapped",
        "size swapped",
        "caption dropped",
    }
    # A different caption is a different input: at the noisiest level the loss moves.
    assert result["caption dropped"][-1] != result["true caption"][-1]


def test_binding_rows_are_the_subsets_losses_each_example_with_its_own_noise(tiny_shapes_run):
    from transfusion_jax.evaluation.suites import image_loss_per_level

    ev = wr.load_run(tiny_shapes_run, num=12)
    binding = wr.run_binding(ev)
    true = [x.captions[0] for x in ev.examples()]
    for attribute, count in binding["scenes"].items():
        keep = [k for k, c in enumerate(true) if wr.exchanged_caption(c, attribute)]
        assert count == len(keep)
        if not keep:
            continue
        # The subset's mean is the mean of its examples scored one at a time: each example keeps
        # the noise it has in the full list, whatever else is in the batch.
        alone = [list(image_loss_per_level(ev, true, keep=[k]).values()) for k in keep]
        np.testing.assert_allclose(
            binding[f"{attribute}: true caption"], np.mean(alone, axis=0), rtol=1e-5
        )
        assert binding[f"{attribute}: exchanged"] != binding[f"{attribute}: true caption"]
    with pytest.raises(ValueError, match="captions for"):
        image_loss_per_level(ev, true[:3])
