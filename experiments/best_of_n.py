"""How far is a shapes run's drawing from exact, and can the model tell its good drawings apart?

  python -m experiments.best_of_n --workdir workdirs/quickstart --tries 8 --out DIR

Draws each of `--num` held-out captions `--tries` times (the quickstart's sampler, guidance and
steps; try 0 with the evaluation's own seeds, so its rate is the quickstart's text -> image figure)
and scores every drawing with the exact scorer. Reports, for the first n tries (n = 1..tries):
- any: the share of captions drawn exactly at least once (what n tries can reach);
- picked: the share whose drawing the run itself ranks first, by the log-likelihood of the caption
  after the drawing (the captioning half of the model scoring the generating half, as DALL-E
  ranked its samples with CLIP);
each over all captions and over the one- and two-object scenes apart, with the exact scorer's
aspects (count, colours, shapes, sizes, relation) over every drawing. Writes OUT/report.json and
OUT/picked.png (the drawings ranked first). A diagnosis, not a sampler: the quickstart's figure
stays one drawing per caption.
"""

import argparse
import json
import pathlib
import time

import numpy as np

from experiments.class_captions import paired_log_likelihoods, row_log_likelihoods
from transfusion_jax.data import shapes
from transfusion_jax.data.images import array_to_image


def first_n_rates(exact: np.ndarray, scores: np.ndarray) -> dict:
    """exact, scores [tries, captions] -> {"any": [...], "picked": [...]}, entry n-1 the share of
    captions with an exact drawing among the first n tries, and with the best-scored of them
    exact (the earliest on ties)."""
    tries, num = exact.shape
    rates = {"any": [], "picked": []}
    for n in range(1, tries + 1):
        rates["any"].append(float(exact[:n].any(0).mean()))
        best = scores[:n].argmax(0)
        rates["picked"].append(float(exact[best, np.arange(num)].mean()))
    return rates


def draw_tries(ev, prompts: list[str], tries: int) -> np.ndarray:
    """uint8 [tries, len(prompts), S, S, 3]: try k with the evaluation's seeds shifted by
    1000 k (try 0 is the shapes suite's own drawing)."""
    from transfusion_jax.evaluation.suites import draw

    seed, drawn = ev.settings.seed, []
    try:
        for k in range(tries):
            start = time.perf_counter()
            ev.settings.seed = seed + 1000 * k
            drawn.append(np.stack(draw(ev, prompts)))
            print(f"try {k + 1}/{tries}: {time.perf_counter() - start:.0f} s", flush=True)
    finally:
        ev.settings.seed = seed
    return np.stack(drawn)


def run(ev, num: int, tries: int) -> tuple[dict, np.ndarray]:
    """(report, the picked drawings) of an evaluator over the first `num` held-out scenes."""
    from transfusion_jax.evaluation.heldout import HELD_OUT_SEED

    scenes = [shapes.scene_for_index(i, HELD_OUT_SEED) for i in range(num)]
    prompts = [shapes.caption(s) for s in scenes]
    drawn = draw_tries(ev, prompts, tries)

    def judged(images):
        return [shapes.score_image(x, s) for x, s in zip(images, scenes, strict=True)]

    scores_of = [judged(images) for images in drawn]  # [tries][captions] of {aspect: bool}
    aspects = {k: np.array([[s[k] for s in row] for row in scores_of]) for k in scores_of[0][0]}
    exact = aspects["correct"]
    row_score = row_log_likelihoods(ev)
    scores = np.stack(
        [paired_log_likelihoods(ev, array_to_image(x), prompts, row_score) for x in drawn]
    )
    two = np.array([len(s.objects) == 2 for s in scenes])
    report = {
        "step": ev.step,
        "num": num,
        "tries": tries,
        "cfg_scale": ev.settings.cfg_scale,
        "sampling_steps": ev.settings.sampling_steps,
        "one_object_scenes": int((~two).sum()),
        "exact_per_try": exact.mean(1).tolist(),
    }
    everything = np.ones_like(two)
    for kind, chosen in (("all", everything), ("one_object", ~two), ("two_objects", two)):
        if chosen.any():
            report[kind] = first_n_rates(exact[:, chosen], scores[:, chosen])
            report[kind]["aspects"] = {k: float(v[:, chosen].mean()) for k, v in aspects.items()}
    return report, drawn[scores.argmax(0), np.arange(num)]


def table(report: dict) -> str:
    """The report as text: one row per n."""
    lines = [
        f"{report['num']} held-out captions ({report['one_object_scenes']} one-object), "
        f"step {report['step']}, guidance {report['cfg_scale']}, {report['sampling_steps']} steps",
        "n tries | exact in any: all / one / two objects | exact when picked: all / one / two",
    ]

    def rates(rate: str, i: int) -> str:
        kinds = ("all", "one_object", "two_objects")
        cells = [f"{100 * report[k][rate][i]:3.0f}%" if k in report else "   -" for k in kinds]
        return " / ".join(cells)

    for i in range(report["tries"]):
        lines.append(f"{i + 1:7d} | {rates('any', i):>38} | {rates('picked', i):>30}")
    for kind in ("one_object", "two_objects"):
        if kind in report:
            shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in report[kind]["aspects"].items())
            lines.append(f"every drawing, {kind.replace('_', ' ')}: {shares}")
    return "\n".join(lines)


def main(argv=None):
    from PIL import Image

    from experiments.word_reliance import load_run
    from transfusion_jax.inference import image_grid

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a trained shapes run")
    parser.add_argument("--step", type=int, help="the run's checkpoint (default: the newest)")
    parser.add_argument("--num", type=int, default=64, help="held-out captions")
    parser.add_argument("--tries", type=int, default=8, help="drawings per caption")
    parser.add_argument("--steps", type=int, default=100, help="denoising steps per drawing")
    parser.add_argument("--cfg_scale", type=float, default=3.0, help="guidance scale")
    parser.add_argument("--out", help="a folder for report.json and picked.png")
    args = parser.parse_args(argv)
    for name in ("num", "tries", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be at least 1")
    ev = load_run(args.workdir, num=args.num, step=args.step)
    ev.settings.update(cfg_scale=args.cfg_scale, sampling_steps=args.steps)
    report, picked = run(ev, args.num, args.tries)
    print(table(report))
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        Image.fromarray(image_grid(list(picked))).save(out / "picked.png")


if __name__ == "__main__":
    main()
