"""The shapes dataset against independent truth: captions and their parser, the geometry the
renderer draws, the scorer on hand-drawn and rendered images, and its verdict on every kind of
mistake in an image or a caption."""

import dataclasses

import numpy as np
import pytest

from transfusion_jax.data.shapes import (
    ASPECTS,
    BACKGROUND,
    COLORS,
    INVERSE,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapesDataset,
    caption,
    caption_words,
    parse_caption,
    read_scene,
    render,
    scene_for_index,
    score_caption,
    score_image,
)
from transfusion_jax.data.tokenizer import make_tokenizer

RED_ABOVE_BLUE = Scene(
    (ShapeObject("red", "circle", "small"), ShapeObject("blue", "square", "large")), "above"
)


def two_colour_scenes(count: int) -> list[Scene]:
    """The first `count` dataset scenes with two objects of different colours, so each object's
    pixels can be found by colour alone."""
    scenes = (scene_for_index(i) for i in range(10 * count))
    return [s for s in scenes if s.relation and s.objects[0].color != s.objects[1].color][:count]


def pixels_of(image: np.ndarray, color: str) -> np.ndarray:
    return (image == COLORS[color]).all(-1)


def to_float(image: np.ndarray) -> np.ndarray:
    return (image / 127.5 - 1).astype(np.float32)


def blur(image: np.ndarray) -> np.ndarray:
    """A mild [1, 2, 1] / 4 binomial blur in both directions, edges repeated."""
    x = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    k, n = (0.25, 0.5, 0.25), len(image)
    return sum(k[i] * k[j] * x[i : i + n, j : j + n] for i in range(3) for j in range(3))


def blank(n: int = 32) -> np.ndarray:
    return np.full((n, n, 3), BACKGROUND, np.uint8)


# --- scenes and captions ---


def test_caption_and_parse_by_hand():
    assert caption(RED_ABOVE_BLUE) == "a small red circle above a large blue square"
    assert caption(Scene((ShapeObject("green", "triangle", "large"),))) == (
        "a large green triangle"
    )
    assert parse_caption("  A Large YELLOW triangle   left of a small black circle ") == Scene(
        (ShapeObject("yellow", "triangle", "large"), ShapeObject("black", "circle", "small")),
        "left of",
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a red circle",  # no size
        "small red circle",
        "the small red circle",
        "a small purple circle",
        "a small red hexagon",
        "a small red circle above",
        "a small red circle next to a large blue square",
        "a small red circle left a large blue square",
        "a small red circle above a small red circle",  # identical objects
        "a small red circle above a large blue square and a small green triangle",
    ],
)
def test_parse_caption_rejects_garbage(text):
    assert parse_caption(text) is None


def test_scenes_are_deterministic_varied_and_round_trip():
    scenes = [scene_for_index(i) for i in range(2000)]
    assert scenes[:50] == [scene_for_index(i) for i in range(50)]
    assert scenes[:50] != [scene_for_index(i, seed=1) for i in range(50)]
    for scene in scenes:
        text = caption(scene)
        assert parse_caption(text) == scene
        assert parse_caption("  " + text.upper().replace(" ", "   ") + "\n") == scene
    objects = [o for s in scenes for o in s.objects]
    assert {o.color for o in objects} == set(COLORS)
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.size for o in objects} == set(SIZES)
    assert {s.relation for s in scenes} == {None, *RELATIONS}
    singles = sum(s.relation is None for s in scenes) / len(scenes)
    assert 0.2 < singles < 0.3
    assert len({caption(s) for s in scenes}) > 1000


def test_caption_words_are_exactly_the_words_captions_use():
    scenes = [scene_for_index(i) for i in range(2000)]
    used = {w for s in scenes for w in caption(s).split()}
    assert set(caption_words()) == used
    assert len(caption_words()) == len(used)  # no word twice
    tokenizer = make_tokenizer("words:" + ",".join(caption_words()))
    for scene in scenes[:200]:  # a token per word
        assert len(tokenizer.encode(caption(scene))) == len(caption(scene).split())


def test_dataset_items_are_deterministic_by_index():
    data = ShapesDataset(image_size=32)
    assert len(data) == 2**31 - 1
    item = data[7]
    again = ShapesDataset(image_size=32)[np.int64(7)]
    assert item["image"].dtype == np.uint8 and item["image"].shape == (32, 32, 3)
    np.testing.assert_array_equal(item["image"], again["image"])
    assert item["text"] == again["text"] == caption(scene_for_index(7))
    assert len({data[i]["image"].tobytes() for i in range(50)}) == 50
    other_seed = ShapesDataset(image_size=32, seed=1)
    assert [data[i]["text"] for i in range(20)] != [other_seed[i]["text"] for i in range(20)]
    for index in (-1, len(data)):
        with pytest.raises(IndexError):
            data[index]


@pytest.mark.parametrize("n", [16, 32, 64])
def test_render_draws_the_stated_layout(n):
    """Measured on the pixels by colour: the object sides, no overlap, a clear gap along the
    relation's axis in the stated order, and less offset across it than along it."""
    rng = np.random.default_rng(0)
    for scene in two_colour_scenes(100):
        image = render(scene, n, rng)
        colors = {tuple(c) for c in image.reshape(-1, 3)}
        assert colors == {BACKGROUND, *(COLORS[o.color] for o in scene.objects)}
        boxes, centres = [], []
        for obj in scene.objects:
            ys, xs = np.nonzero(pixels_of(image, obj.color))
            assert np.ptp(ys) + 1 == np.ptp(xs) + 1 == round(SIZES[obj.size] * n)
            boxes.append((ys.min(), ys.max(), xs.min(), xs.max()))
            centres.append(((ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2))
        vertical = scene.relation in ("above", "below")
        lo, hi = (0, 1) if vertical else (2, 3)
        first, second = boxes if scene.relation in ("above", "left of") else boxes[::-1]
        assert second[lo] - first[hi] > 2  # a gap of at least two background pixels
        along = abs(centres[0][1 - vertical] - centres[1][1 - vertical])
        across = abs(centres[0][vertical] - centres[1][vertical])
        assert across <= along / 3


# --- the scorer on images ---


def draw(image: np.ndarray, shape: str, color: str, top: int, left: int, side: int):
    """Paints a shape with numpy masks, independently of the renderer; "flipped" is an upside-down
    triangle and "wide" a rectangle twice as wide as high, which are none of ours."""
    yy, xx = np.mgrid[: len(image), : len(image)]
    y, x, c = yy - top, xx - left, (side - 1) / 2
    inside = (y >= 0) & (y < side) & (x >= 0) & (x < side)
    masks = {
        "square": inside,
        "circle": (y - c) ** 2 + (x - c) ** 2 <= (side / 2) ** 2,
        "triangle": inside & (abs(x - c) <= (y + 1) / 2),
        "flipped": inside & (abs(x - c) <= (side - y) / 2),
        "wide": (y >= 0) & (y < side // 2) & (x >= 0) & (x < side),
    }
    image[masks[shape]] = COLORS[color]


@pytest.mark.parametrize("n", [32, 64])
@pytest.mark.parametrize("shape", SHAPES)
def test_read_scene_on_hand_drawn_shapes(shape, n):
    for size in SIZES:
        image = blank(n)
        draw(image, shape, "green", n // 4, n // 3, round(SIZES[size] * n))
        assert read_scene(image) == Scene((ShapeObject("green", shape, size),))


def test_read_scene_on_hand_drawn_pairs_and_misfits():
    image = blank()
    draw(image, "square", "red", 3, 2, 12)
    draw(image, "circle", "blue", 5, 20, 8)
    square, circle = ShapeObject("red", "square", "large"), ShapeObject("blue", "circle", "small")
    assert Scene((square, circle), "left of").matches(read_scene(image))
    image = blank()
    draw(image, "square", "red", 2, 2, 12)
    draw(image, "circle", "blue", 18, 18, 8)  # diagonal: neither beside nor above
    assert read_scene(image) is None
    assert score_image(image, Scene((square, circle), "above"))["relation"] is False
    for misfit, side in [("flipped", 12), ("wide", 12), ("square", 24), ("square", 3)]:
        image = blank()
        draw(image, misfit, "red", 4, 4, side)
        assert read_scene(image) is None, misfit
    assert read_scene(blank()) is None
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert read_scene(noise) is None


@pytest.mark.parametrize("n", [16, 32, 64])
def test_scorer_reads_every_rendered_scene(n):
    """100% at every size on the images, as floats in [-1, 1], and with gaussian noise of 0.05
    (in [-1, 1] units); with a mild blur before the noise, 100% at 32 and 64 and at least 99% at
    16, where a small shape is 4 pixels wide (measured over 5000 indices: 99.8%)."""
    data, rng = ShapesDataset(image_size=n), np.random.default_rng(0)
    blurred = []
    for index in range(300):
        image, scene = data[index]["image"], scene_for_index(index)
        assert scene.matches(read_scene(image))
        noisy = to_float(image) + rng.normal(0, 0.05, image.shape)
        for seen in (image, to_float(image), noisy):
            score = score_image(seen, scene)
            assert all(score.values()), (index, caption(scene), score)
        assert score_image(image, caption(scene))["correct"]
        blurred.append(score_image(to_float(blur(image)) + rng.normal(0, 0.05, image.shape), scene))
    assert np.mean([s["correct"] for s in blurred]) >= (0.99 if n == 16 else 1.0)


def expect(score: dict, wrong: set[str]):
    """Not correct, the aspects in `wrong` flagged and every other aspect still right."""
    assert score["correct"] is False
    assert {a for a in ASPECTS if not score[a]} == wrong, score


def changed(scene: Scene, index: int, **change) -> Scene:
    """The scene with one object's attributes changed."""
    objects = list(scene.objects)
    objects[index] = dataclasses.replace(objects[index], **change)
    return Scene(tuple(objects), scene.relation)


def free_spot(image: np.ndarray, side: int) -> tuple[int, int]:
    """The top-left corner of a side x side square with a background ring around it."""
    n = len(image)
    background = (image == BACKGROUND).all(-1)
    for top in range(1, n - side):
        for left in range(1, n - side):
            if background[top - 1 : top + side + 1, left - 1 : left + side + 1].all():
                return top, left
    raise AssertionError("no room for another object")


@pytest.mark.parametrize("n", [32, 64])
def test_scorer_flags_each_mistake_in_an_image(n):
    for i, scene in enumerate(two_colour_scenes(40)):
        image = render(scene, n, np.random.default_rng(i))
        assert score_image(image, scene)["correct"]
        first, second = scene.objects
        unused = next(c for c in COLORS if c not in (first.color, second.color))
        recoloured = image.copy()
        recoloured[pixels_of(image, first.color)] = COLORS[unused]
        expect(score_image(recoloured, scene), {"colors"})
        crossed = image.copy()  # each colour on the other object: right counts, wrong binding
        crossed[pixels_of(image, first.color)] = COLORS[second.color]
        crossed[pixels_of(image, second.color)] = COLORS[first.color]
        score = score_image(crossed, scene)
        assert score["colors"] and score["shapes"] and not score["correct"]
        moved = render(Scene(scene.objects, INVERSE[scene.relation]), n, np.random.default_rng(i))
        expect(score_image(moved, scene), {"relation"})
        shape = next(s for s in SHAPES if s != first.shape)
        expect(score_image(render(changed(scene, 0, shape=shape), n), scene), {"shapes"})
        size = next(s for s in SIZES if s != first.size)
        expect(score_image(render(changed(scene, 0, size=size), n), scene), {"sizes"})
        deleted = image.copy()
        deleted[pixels_of(image, first.color)] = BACKGROUND
        expect(score_image(deleted, scene), set(ASPECTS))
        added = image.copy()
        draw(added, "square", unused, *free_spot(image, n // 4), n // 4)
        expect(score_image(added, scene), set(ASPECTS))


def test_scorer_flags_an_extra_object_beside_a_single_one():
    single = Scene(RED_ABOVE_BLUE.objects[:1])
    assert score_image(render(single, 32), single)["correct"]
    expect(score_image(render(RED_ABOVE_BLUE, 32), single), set(ASPECTS))


# --- the scorer on captions ---


def test_score_caption():
    scene = RED_ABOVE_BLUE
    for text in (caption(scene), "a large blue square below a small red circle"):
        score = score_caption(text, scene)
        assert score["parsed"] and score["correct"] and all(score[a] for a in ASPECTS), text
    assert score_caption(caption(scene), caption(scene))["correct"]
    wrong = {
        "a small green circle above a large blue square": {"colors"},
        "a small red triangle above a large blue square": {"shapes"},
        "a large red circle above a large blue square": {"sizes"},
        "a small red circle left of a large blue square": {"relation"},
        "a small red circle below a large blue square": {"relation"},
        "a small red circle": set(ASPECTS),
    }
    for text, aspects in wrong.items():
        score = score_caption(text, scene)
        assert score["parsed"], text
        expect(score, aspects)
    crossed = score_caption("a small blue circle above a large red square", scene)
    assert crossed["colors"] and crossed["shapes"] and not crossed["correct"]
    for garbage in ("", "a small red circle above", "red circle blue square"):
        score = score_caption(garbage, scene)
        assert not score["parsed"] and not score["correct"]
