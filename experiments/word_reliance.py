"""Which caption words does a shapes run's drawing use? The held-out diffusion loss, word by word.

  python -m experiments.word_reliance --workdir workdirs/quickstart       # the run, and the ideal
  python -m experiments.word_reliance --ideal_only                        # the ideal alone
  python -m experiments.word_reliance --workdir DIR --step 2000 --ideal_num 0  # one checkpoint

Drawing on the shapes data follows the colour words long before the shape words. This measures it
on the model's own objective, at fixed noise and fixed held-out images:
- the run: the held-out diffusion loss at each noise level with the true caption, with one
  attribute of every object swapped for another value (colour, shape or size; the rest of the
  caption kept), and with the caption dropped (guidance's unconditional prompt). A model that
  ignores a word loses nothing when it is swapped;
- binding: on the two-object scenes whose objects differ in an attribute, the loss with that
  attribute exchanged between them ("a red circle above a blue square" -> "a blue circle above a
  red square"): the same words bound the other way. A model that draws the right words on the
  wrong objects loses nothing; one that binds loses about what a swap costs it;
- the ideal: for one-object scenes every picture a caption allows can be enumerated (each placement
  the data draws), so the exact posterior-mean denoiser is computable. Its loss with the full
  caption, and with one attribute unknown (a uniform mixture over its values), is what knowing that
  word is worth to a perfect model: the signal the diffusion loss gives for learning it.
Losses are the flow objective's (velocity MSE per element; for the run, its own objective). The
noise levels are fractions of the schedule (flow: sigma). Prints one table per part and writes
OUT/report.json with `--out`.
"""

import argparse
import dataclasses
import json
import pathlib

import numpy as np

from transfusion_jax.data import shapes

ATTRIBUTE_VALUES = {
    "color": tuple(shapes.COLORS),
    "shape": shapes.SHAPES,
    "size": tuple(shapes.SIZES),
}
LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)


def swapped_caption(text: str, attribute: str, rng: np.random.Generator) -> str | None:
    """The caption with `attribute` of every object changed to another value (None when that
    would make the two objects identical, which no caption states)."""
    scene = shapes.parse_caption(text)
    others = [
        dataclasses.replace(o, **{attribute: rng.choice(_other_values(o, attribute))})
        for o in scene.objects
    ]
    if len(others) == 2 and others[0] == others[1]:
        return None
    return shapes.caption(shapes.Scene(tuple(others), scene.relation))


def exchanged_caption(text: str, attribute: str) -> str | None:
    """The caption with the two objects' `attribute` exchanged ("a small red circle above a large
    blue square" -> "... red square above ... blue circle" for shape): the same words, bound the
    other way. None for a one-object scene or two objects that share the value."""
    scene = shapes.parse_caption(text)
    if len(scene.objects) != 2:
        return None
    a, b = scene.objects
    if getattr(a, attribute) == getattr(b, attribute):
        return None
    exchanged = (
        dataclasses.replace(a, **{attribute: getattr(b, attribute)}),
        dataclasses.replace(b, **{attribute: getattr(a, attribute)}),
    )
    return shapes.caption(shapes.Scene(exchanged, scene.relation))


def _other_values(obj, attribute):
    return [v for v in ATTRIBUTE_VALUES[attribute] if v != getattr(obj, attribute)]


class _Placed:
    """Stands in for the rng `shapes.render` draws a placement from: returns the given values."""

    def __init__(self, *values):
        self.values = list(values)

    def integers(self, low, high):
        del low, high
        return self.values.pop(0)


def placements(obj: shapes.ShapeObject, image_size: int) -> np.ndarray:
    """Every picture of the one-object scene `obj` the data can draw, float [P, S*S*3] in [-1, 1]:
    the layout's x and y each take every value in [margin, size - margin - side]."""
    side = round(shapes.SIZES[obj.size] * image_size)
    margin = max(1, image_size // 32)
    spots = range(margin, image_size - margin - side + 1)
    scene = shapes.Scene((obj,))
    pictures = [shapes.render(scene, image_size, _Placed(x, y)) for x in spots for y in spots]
    return np.stack(pictures).reshape(len(pictures), -1) / 127.5 - 1.0


def posterior_mean(x_t: np.ndarray, sigma: float, candidates: list[np.ndarray]) -> np.ndarray:
    """E[x0 | x_t] for x_t = (1 - sigma) x0 + sigma eps, x0 uniform over the objects in
    `candidates` (each a [P, D] array of its placements, uniform within)."""
    log_w = np.concatenate(
        [
            -((x_t - (1 - sigma) * c) ** 2).sum(1) / (2 * sigma**2) - np.log(len(c))
            for c in candidates
        ]
    )
    w = np.exp(log_w - log_w.max())
    return (w / w.sum()) @ np.concatenate(candidates)


def ideal_word_values(image_size: int = 16, num: int = 300, seed: int = 0) -> dict:
    """{knowledge: [velocity MSE per level]} of the exact denoiser on one-object scenes."""
    objects = [
        shapes.ShapeObject(c, s, z)
        for c in shapes.COLORS
        for s in shapes.SHAPES
        for z in shapes.SIZES
    ]
    pictures = {o: placements(o, image_size) for o in objects}
    knowing = {
        "full caption": lambda o: [o],
        **{
            f"{a} unknown": (
                lambda o, a=a: [dataclasses.replace(o, **{a: v}) for v in ATTRIBUTE_VALUES[a]]
            )
            for a in ATTRIBUTE_VALUES
        },
        "no caption": lambda o: objects,
    }
    rng = np.random.default_rng(seed)
    losses = {k: np.zeros(len(LEVELS)) for k in knowing}
    for _ in range(num):
        obj = objects[rng.integers(len(objects))]
        x0 = pictures[obj][rng.integers(len(pictures[obj]))]
        eps = rng.normal(size=x0.shape)
        for j, sigma in enumerate(LEVELS):
            x_t = (1 - sigma) * x0 + sigma * eps
            for k, allowed in knowing.items():
                x0_hat = posterior_mean(x_t, sigma, [pictures[o] for o in allowed(obj)])
                losses[k][j] += ((x0_hat - x0) ** 2).mean() / sigma**2 / num
    return {k: v.tolist() for k, v in losses.items()}


def load_run(workdir, num: int = 128, step: int | None = None):
    """An evaluator of a trained shapes run over `num` held-out scenes, at the levels of LEVELS
    and the diffusion suite's noise (so a "true caption" row is that suite's figure)."""
    from transfusion_jax.evaluation.evaluator import Evaluator
    from transfusion_jax.inference import load_trained

    model, cfg, step = load_trained(workdir, step=step)
    if cfg.data.source != "shapes":
        raise ValueError(f"--workdir {workdir}: data.source={cfg.data.source!r}, not shapes")
    cfg.eval.num_examples = num
    cfg.eval.diffusion_levels = LEVELS
    return Evaluator(cfg, model, step=step)


def run_word_reliance(ev, seed: int = 0) -> dict:
    """{caption variant: [held-out diffusion loss per level]} of a run (`load_run`)."""
    from transfusion_jax.evaluation.suites import image_loss_per_level

    rng = np.random.default_rng(seed)
    true = [x.captions[0] for x in ev.examples()]
    variants = {"true caption": true}
    for attribute in ATTRIBUTE_VALUES:
        variants[f"{attribute} swapped"] = [swapped_caption(c, attribute, rng) or c for c in true]
    result = {k: list(image_loss_per_level(ev, v).values()) for k, v in variants.items()}
    result["caption dropped"] = list(image_loss_per_level(ev, true, drop_caption=True).values())
    return result


def run_binding(ev) -> dict:
    """{row: [held-out diffusion loss per level]} for binding: per attribute, the two-object
    scenes whose objects differ in it, with the true caption and with the attribute exchanged
    between the objects. A model that draws the right words on the wrong objects loses nothing;
    "scenes" gives each subset's size."""
    from transfusion_jax.evaluation.suites import image_loss_per_level

    true = [x.captions[0] for x in ev.examples()]
    result, sizes = {}, {}
    for attribute in ATTRIBUTE_VALUES:
        exchanged = [exchanged_caption(c, attribute) for c in true]
        keep = [k for k, c in enumerate(exchanged) if c is not None]
        sizes[attribute] = len(keep)
        if not keep:
            continue
        alt = [c or t for c, t in zip(exchanged, true, strict=True)]
        result[f"{attribute}: true caption"] = list(
            image_loss_per_level(ev, true, keep=keep).values()
        )
        result[f"{attribute}: exchanged"] = list(image_loss_per_level(ev, alt, keep=keep).values())
    result["scenes"] = sizes
    return result


def table(title: str, losses: dict, reference: str) -> str:
    """Each row's loss per level and its excess over the reference row, as a share."""
    ref = np.array(losses[reference])
    head = " / ".join(f"{x:g}" for x in LEVELS)
    lines = [title, f"| | loss at {head} | excess over {reference} |", "|---|---|---|"]
    for name, values in losses.items():
        values = np.array(values)
        excess = np.where(ref > 1e-6, values / np.maximum(ref, 1e-12) - 1, np.nan)
        lines.append(
            f"| {name} | {' / '.join(f'{v:.4f}' for v in values)} | "
            f"{' / '.join('-' if np.isnan(e) else f'{e:+.0%}' for e in excess)} |"
        )
    return "\n".join(lines)


def binding_table(title: str, binding: dict) -> str:
    """Per attribute: how much more the loss is with the attribute exchanged between the two
    objects than with the true caption, on the scenes where that changes the caption."""
    head = " / ".join(f"{x:g}" for x in LEVELS)
    lines = [
        title,
        f"| exchanged | scenes | excess over the true caption at {head} |",
        "|---|---|---|",
    ]
    for attribute, count in binding["scenes"].items():
        if not count:
            continue
        true = np.array(binding[f"{attribute}: true caption"])
        excess = np.array(binding[f"{attribute}: exchanged"]) / np.maximum(true, 1e-12) - 1
        lines.append(f"| {attribute} | {count} | {' / '.join(f'{e:+.0%}' for e in excess)} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", help="a trained shapes run")
    parser.add_argument("--step", type=int, help="the run's checkpoint (default: the newest)")
    parser.add_argument("--num", type=int, default=128, help="the run's held-out scenes")
    parser.add_argument("--ideal_only", action="store_true", help="only the exact denoiser")
    parser.add_argument("--ideal_num", type=int, default=300, help="the ideal's scenes; 0: none")
    parser.add_argument("--image_size", type=int, default=16, help="the ideal's image size")
    parser.add_argument("--out", help="a folder for report.json")
    args = parser.parse_args(argv)
    if not args.ideal_only and not args.workdir:
        parser.error("--workdir is required unless --ideal_only")
    report = {"levels": LEVELS}
    if args.workdir and not args.ideal_only:
        ev = load_run(args.workdir, args.num, step=args.step)
        report["run"] = run_word_reliance(ev)
        report["binding"] = run_binding(ev)
        name = f"The run ({args.workdir}, step {ev.step})"
        print(table(f"{name}, {args.num} scenes:", report["run"], "true caption"))
        print(binding_table(f"\n{name}, binding:", report["binding"]))
    if args.ideal_num > 0:
        report["ideal"] = ideal_word_values(args.image_size, args.ideal_num)
        print(table("\nThe exact denoiser, one-object scenes:", report["ideal"], "full caption"))
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
