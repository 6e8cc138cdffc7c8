"""The built-in "shapes" dataset: small drawn scenes with exact captions, and an exact scorer.

A scene is one coloured shape, or two with a spatial relation of the first to the second: "a small
red circle above a large blue square". Item i is a pure function of (seed, i), so the dataset is
infinite, random access and the same on every process. Because the palette, shapes, sizes and
layout rules are fixed, `read_scene` can read a generated image back, so text -> image
(`score_image`) and captioning (`score_caption`) accuracy are measured exactly: a small GenEval for
a model that trains on a laptop CPU in minutes.
"""

import collections
import dataclasses
import math
import operator
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

# Far apart in RGB (and from the background) so a blurred or noisy pixel still has one nearest.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 200, 30),
    "black": (20, 20, 20),
}
BACKGROUND = (255, 255, 255)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.25, "large": 0.375}  # side of the shape's box, a fraction of the image side
RELATIONS = ("above", "below", "left of", "right of")
INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
ATTRIBUTES = ("color", "shape", "size")
ASPECTS = ("count", "colors", "shapes", "sizes", "relation")  # the partial scores, besides correct

SINGLE_FRACTION = 0.25  # share of one-object scenes
MIN_IMAGE_SIZE = 16  # below this two large shapes do not fit side by side

# Reading: a pixel is taken as a mix of the background and the palette colour whose mixing line
# passes nearest (blurred edges are such mixes), if it passes this near (RGB distance), and as
# part of an object where that colour makes up at least half of the mix.
MATCH_DISTANCE = 60.0
SIZE_TOLERANCE = 1.5  # a blob with a side off by more than this factor from every size has none
AXIS_RATIO = 1.5  # centroid offset along the relation's axis / across it, at least
MIN_OFFSET = 0.15  # centroids at least this far apart (of the image side) to have a relation


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One drawn object; a caption always states all three attributes."""

    color: str
    shape: str
    size: str

    def __post_init__(self):
        if self.color not in COLORS or self.shape not in SHAPES or self.size not in SIZES:
            raise ValueError(f"not a shapes object: {self}")


@dataclasses.dataclass(frozen=True)
class Scene:
    """One object, or two distinct objects with `relation` = where the first is from the second."""

    objects: tuple[ShapeObject, ...]
    relation: str | None = None

    def __post_init__(self):
        two = len(self.objects) == 2
        if len(self.objects) not in (1, 2) or (self.relation in RELATIONS) != two:
            raise ValueError(f"a scene is one object, or two and a relation: {self}")
        if two and self.objects[0] == self.objects[1]:
            raise ValueError(f"identical objects make the relation meaningless: {self}")

    def swapped(self) -> "Scene":
        """The same picture told from the other object: "A above B" is "B below A"."""
        return Scene(self.objects[::-1], INVERSE[self.relation]) if self.relation else self

    def matches(self, other: "Scene") -> bool:
        """Whether `other` describes the same picture, in either order."""
        return other in (self, self.swapped())


def scene_for_index(index: int, seed: int = 0) -> Scene:
    """Scene `index` of the dataset, a pure function of (seed, index)."""
    return _sample_scene(np.random.default_rng((seed, index)))


def _sample_scene(rng: np.random.Generator) -> Scene:
    """A single object now and then, otherwise two distinct objects and a uniform relation."""
    first = _sample_object(rng)
    if rng.random() < SINGLE_FRACTION:
        return Scene((first,))
    second = first
    while second == first:
        second = _sample_object(rng)
    return Scene((first, second), RELATIONS[rng.integers(len(RELATIONS))])


def _sample_object(rng: np.random.Generator) -> ShapeObject:
    return ShapeObject(
        color=list(COLORS)[rng.integers(len(COLORS))],
        shape=SHAPES[rng.integers(len(SHAPES))],
        size=list(SIZES)[rng.integers(len(SIZES))],
    )


def caption(scene: Scene) -> str:
    """The one way to say a scene, e.g. "a small red circle above a large blue square"."""
    first, *rest = [f"a {o.size} {o.color} {o.shape}" for o in scene.objects]
    return f"{first} {scene.relation} {rest[0]}" if rest else first


def caption_words() -> tuple[str, ...]:
    """Every word a caption can use, for a words tokenizer ("words:" + ",".join(...))."""
    words = ["a", *SIZES, *COLORS, *SHAPES, *(w for r in RELATIONS for w in r.split())]
    return tuple(dict.fromkeys(words))


def parse_caption(text: str) -> Scene | None:
    """The scene a caption states, ignoring case and spacing; None for anything else."""
    words = text.lower().split()
    first = _parse_object(words[:4])
    if first is None:
        return None
    if len(words) == 4:
        return Scene((first,))
    for relation in RELATIONS:
        n = len(relation.split())
        second = _parse_object(words[4 + n :])
        if words[4 : 4 + n] == relation.split() and second not in (None, first):
            return Scene((first, second), relation)
    return None


def _parse_object(words: Sequence[str]) -> ShapeObject | None:
    """The object the words "a SIZE COLOR SHAPE" name, else None."""
    if len(words) != 4 or words[0] != "a":
        return None
    _, size, color, shape = words
    if size not in SIZES or color not in COLORS or shape not in SHAPES:
        return None
    return ShapeObject(color, shape, size)


def render(
    scene: Scene, image_size: int = 32, rng: np.random.Generator | None = None
) -> np.ndarray:
    """The scene drawn on white, uint8 [image_size, image_size, 3]; rng jitters the placement
    (None: centred). Edges are hard, so every object pixel has exactly its palette colour."""
    canvas = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj, (x, y, s) in zip(scene.objects, _layout(scene, image_size, rng), strict=True):
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x, y, x + s - 1, y + s - 1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x, y, x + s - 1, y + s - 1), fill=fill)
        else:  # apex up (two pixels wide for an even side, to stay symmetric), base at the bottom
            apex = [(x + (s - 1) // 2, y), (x + s // 2, y)]
            draw.polygon([*apex, (x + s - 1, y + s - 1), (x, y + s - 1)], fill=fill)
    return np.array(canvas, dtype=np.uint8)


def _layout(scene: Scene, n: int, rng: np.random.Generator | None) -> list[tuple[int, int, int]]:
    """(x, y, side) of each object's box. Two objects follow each other along the relation's axis
    with a gap, and their centres are at most a third of their distance apart across it, so they
    never overlap and the relation is never in doubt."""
    if n < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size {n} is below the minimum {MIN_IMAGE_SIZE}")

    def pick(lo: int, hi: int) -> int:  # an integer in [lo, hi]: random, or the middle
        return int(rng.integers(lo, hi + 1)) if rng is not None else (lo + hi) // 2

    margin, gap = max(1, n // 32), max(2, n // 10)
    sides = [round(SIZES[o.size] * n) for o in scene.objects]
    if scene.relation is None:
        s = sides[0]
        return [(pick(margin, n - margin - s), pick(margin, n - margin - s), s)]
    # Place in reading order along the axis: `lead` is the top or left object.
    first_leads = scene.relation in ("above", "left of")
    lead, trail = sides if first_leads else sides[::-1]
    free = n - 2 * margin - gap - lead - trail
    extra_gap = pick(0, free)
    along_lead = margin + pick(0, free - extra_gap)
    along_trail = along_lead + lead + gap + extra_gap
    across_lead = pick(margin, n - margin - lead)
    limit = ((lead + trail) / 2 + gap + extra_gap) / 3
    centre = across_lead + lead / 2
    options = [
        o for o in range(margin, n - margin - trail + 1) if abs(o + trail / 2 - centre) <= limit
    ]
    across_trail = options[pick(0, len(options) - 1)]
    boxes = [(along_lead, across_lead, lead), (along_trail, across_trail, trail)]
    if not first_leads:
        boxes.reverse()
    if scene.relation in ("above", "below"):
        return [(across, along, s) for along, across, s in boxes]
    return boxes


class ShapesDataset:
    """Item i is {"image": uint8 [S, S, 3], "text": its caption}: random access, deterministic by
    index and as good as infinite, so it serves as a grain RandomAccessDataSource."""

    def __init__(self, image_size: int = 32, seed: int = 0):
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size {image_size} is below the minimum {MIN_IMAGE_SIZE}")
        self.image_size, self.seed = image_size, seed

    def __len__(self) -> int:
        return 2**31 - 1

    def __getitem__(self, index: int) -> dict:
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is outside [0, {len(self)})")
        rng = np.random.default_rng((self.seed, index))  # the scene, then its placement
        scene = _sample_scene(rng)
        return {"image": render(scene, self.image_size, rng), "text": caption(scene)}


@dataclasses.dataclass(frozen=True)
class _Blob:
    """One object found in an image; shape and size are None when they fit none of ours."""

    color: str
    shape: str | None
    size: str | None
    center: tuple[float, float]  # (y, x) centroid in pixels


def read_scene(image: np.ndarray) -> Scene | None:
    """The scene an image shows (uint8 [H, H, 3], or floats in [-1, 1]); None when it shows
    anything else: no or more than two objects, an unknown shape or size, an unclear relation."""
    blobs = _find_blobs(image)
    return _scene_of(blobs, len(image))


def _scene_of(blobs: list[_Blob], n: int) -> Scene | None:
    """The scene the blobs make up, if they make up one."""
    if len(blobs) not in (1, 2) or any(b.shape is None or b.size is None for b in blobs):
        return None
    objects = tuple(ShapeObject(b.color, b.shape, b.size) for b in blobs)
    relation = _relation(blobs[0], blobs[1], n) if len(blobs) == 2 else None
    try:
        return Scene(objects, relation)
    except ValueError:  # two objects without a clear relation, or two identical ones
        return None


def _find_blobs(image: np.ndarray) -> list[_Blob]:
    """Connected regions of one palette colour, specks too small to be a drawn shape left out."""
    offset = _as_rgb(image) - BACKGROUND  # [H, H, 3]
    inks = np.array(list(COLORS.values()), np.float64) - BACKGROUND  # [K, 3]
    share = np.clip(offset @ inks.T / (inks**2).sum(-1), 0, 1)  # [H, H, K] of each colour
    miss = np.linalg.norm(offset[:, :, None] - share[..., None] * inks, axis=-1)
    nearest = miss.argmin(-1)
    share = np.take_along_axis(share, nearest[..., None], -1)[..., 0]
    label = np.where((share >= 0.5) & (miss.min(-1) < MATCH_DISTANCE), nearest, -1)
    n = len(offset)
    min_area = max(3, n * n // 128)  # a quarter of the smallest triangle
    blobs = []
    for k, color in enumerate(COLORS):
        for pixels in _components(label == k):
            if len(pixels) >= min_area:
                shape, size = _classify(pixels, n)
                blobs.append(_Blob(color, shape, size, tuple(pixels.mean(0))))
    return blobs


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """float64 [H, H, 3] in 0..255 from uint8, or from anything else taken as [-1, 1]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square RGB image [H, H, 3], got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float64)
    return (np.clip(image.astype(np.float64), -1, 1) + 1) * 127.5


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of a boolean mask, each as int [count, 2] (y, x) pixels."""
    left = set(map(tuple, np.argwhere(mask).tolist()))
    components = []
    while left:
        stack, pixels = [left.pop()], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for near in [(y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]:
                if near in left:
                    left.remove(near)
                    stack.append(near)
        components.append(np.array(pixels))
    return components


def _classify(pixels: np.ndarray, n: int) -> tuple[str | None, str | None]:
    """(shape, size) of a blob from its bounding box: how much of the box it fills (square 1,
    circle pi/4, triangle 1/2) and how far its mass sinks below the box's middle (an upright
    triangle's centroid is a sixth of its height low, the others' none)."""
    ys, xs = pixels[:, 0], pixels[:, 1]
    h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
    fill = len(pixels) / (h * w)
    sink = (ys.mean() - (ys.min() + ys.max()) / 2) / h
    shape = None
    if 0.75 <= w / h <= 4 / 3:
        if 0.06 < sink < 0.25 and 0.35 < fill < 0.8:
            shape = "triangle"
        elif abs(sink) < 0.04 and 0.6 < fill < 0.9:
            shape = "circle"
        elif abs(sink) < 0.04 and fill >= 0.9:
            shape = "square"
    side = max(h, w) / n
    nearest = min(SIZES, key=lambda size: abs(math.log(side / SIZES[size])))
    size = nearest if abs(math.log(side / SIZES[nearest])) <= math.log(SIZE_TOLERANCE) else None
    return shape, size


def _relation(a: _Blob, b: _Blob, n: int) -> str | None:
    """Where blob a is from blob b by their centroids; None when too close or too diagonal."""
    dy, dx = a.center[0] - b.center[0], a.center[1] - b.center[1]
    if max(abs(dy), abs(dx)) < MIN_OFFSET * n:
        return None
    if abs(dy) >= AXIS_RATIO * abs(dx):
        return "above" if dy < 0 else "below"
    if abs(dx) >= AXIS_RATIO * abs(dy):
        return "left of" if dx < 0 else "right of"
    return None


def _target(scene_or_caption: Scene | str) -> Scene:
    """Scorers take the scene or its caption."""
    if isinstance(scene_or_caption, Scene):
        return scene_or_caption
    scene = parse_caption(scene_or_caption)
    if scene is None:
        raise ValueError(f"not a shapes caption: {scene_or_caption!r}")
    return scene


def _aspects(found: Sequence, relation_of: Callable[[int, int], str | None], target: Scene) -> dict:
    """Per-aspect agreement of the objects found with the target's, each judged alone: the count,
    the multisets of colours, shapes and sizes, and the relation between the found objects paired
    with the target's by most agreeing attributes. Which attribute sits on which object (binding)
    is left to `correct`."""
    want = target.objects
    flags = {"count": len(found) == len(want)}
    for attr in ATTRIBUTES:
        counts = [collections.Counter(getattr(o, attr) for o in objs) for objs in (found, want)]
        flags[attr + "s"] = counts[0] == counts[1]
    flags["relation"] = flags["count"]
    if flags["count"] and target.relation:

        def agreement(pairing):
            return sum(
                getattr(found[i], attr) == getattr(obj, attr)
                for i, obj in zip(pairing, want, strict=True)
                for attr in ATTRIBUTES
            )

        pairings = [(0, 1), (1, 0)]
        best = max(map(agreement, pairings))
        flags["relation"] = any(
            relation_of(*p) == target.relation for p in pairings if agreement(p) == best
        )
    return flags


def score_image(image: np.ndarray, scene_or_caption: Scene | str) -> dict[str, bool]:
    """Text -> image accuracy of one image: `correct` iff it shows exactly the scene (objects,
    their attributes and the relation), plus `count`, `colors`, `shapes`, `sizes` and `relation`
    for partial accuracy."""
    target = _target(scene_or_caption)
    blobs = _find_blobs(image)
    n = len(image)
    read = _scene_of(blobs, n)
    aspects = _aspects(blobs, lambda i, j: _relation(blobs[i], blobs[j], n), target)
    return {"correct": read is not None and target.matches(read), **aspects}


def score_caption(generated_text: str, scene_or_caption: Scene | str) -> dict[str, bool]:
    """Captioning accuracy of one caption: `parsed` iff it is a valid caption, `correct` iff it
    states the scene (in either order, "B below A" for "A above B"), plus the aspects of
    `score_image`."""
    target = _target(scene_or_caption)
    said = parse_caption(generated_text)
    if said is None:
        return {"correct": False, "parsed": False} | dict.fromkeys(ASPECTS, False)

    def relation_of(i: int, j: int) -> str:
        return said.relation if i < j else INVERSE[said.relation]

    return {
        "correct": target.matches(said),
        "parsed": True,
        **_aspects(said.objects, relation_of, target),
    }
