"""Score a trained run on held-out data: the numbers to compare checkpoints and runs by.

  python -m transfusion_jax.evaluate --workdir DIR --suite shapes,text,diffusion
  python -m transfusion_jax.evaluate --workdir DIR --suite images \
      --inception_weights pt_inception-2015-12-05-6726825d.pth --clip_weights clip-vit-b32/

Suites (`evaluation/suites.py`): shapes, text, diffusion, captions, images. Loads the newest
checkpoint that restores (`--step N` for another, `--ema` for the EMA weights), prints one
`suite/metric=value` line per metric, and writes DIR/eval/STEP.json (STEP-ema.json for the EMA
weights): {"step", "ema", "metrics", "settings" and "seconds" per suite}. Suites run later add
their metrics to the same file. What a suite drew or wrote goes to DIR/eval/STEP/ (grids,
captions.txt). The suites' sizes, seed and weights default to the run's `eval` config section;
the flags override them.
"""

import argparse
import dataclasses
import json
import sys

import numpy as np
from etils import epath
from PIL import Image

from transfusion_jax import cli
from transfusion_jax.data.images import to_uint8
from transfusion_jax.evaluation.evaluator import Evaluator, eval_settings
from transfusion_jax.inference import image_grid, load_trained
from transfusion_jax.paths import as_path, save_image, write_atomically
from transfusion_jax.workdir import RunError

# flag -> eval config key
OVERRIDES = {
    "num": "num_examples",
    "batch_size": "batch_size",
    "seed": "seed",
    "steps": "sampling_steps",
    "cfg_scale": "cfg_scale",
    "text_path": "text_path",
    "data_path": "data_path",
    "inception_weights": "inception_weights",
    "clip_weights": "clip_weights",
}


def result_path(workdir, step: int, ema: bool) -> epath.Path:
    """DIR/eval/STEP.json; for an exported FILE.safetensors, FILE_eval/STEP.json beside it."""
    workdir = as_path(workdir)
    folder = workdir / "eval" if workdir.is_dir() else workdir.with_name(workdir.stem + "_eval")
    return folder / f"{step}{'-ema' if ema else ''}.json"


def write_results(path, step: int, ema: bool, metrics: dict, settings, seconds: dict) -> dict:
    """Adds `metrics` to the file's (a suite run again replaces its own values)."""
    path = as_path(path)
    record = {"step": step, "ema": ema, "metrics": {}, "settings": {}, "seconds": {}}
    if path.is_file():
        record = json.loads(path.read_text())
    record["metrics"].update(metrics)
    record["seconds"] = {**record.get("seconds", {}), **seconds}
    # per suite: suites run in separate calls may have used other sizes
    used = json.loads(json.dumps(settings.to_dict(), default=list))
    record["settings"] = {**record.get("settings", {}), **dict.fromkeys(seconds, used)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(record, indent=2, default=list) + "\n")
    return record


def save_artifacts(artifacts: dict, out) -> list[epath.Path]:
    """Grids and captions.txt of what the suites drew and wrote."""
    out = as_path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, lines = [], []
    if "shapes" in artifacts:
        a = artifacts["shapes"]
        save_image(Image.fromarray(image_grid(a["drawn"])), out / "shapes_drawn.png")
        save_image(Image.fromarray(image_grid(a["pictures"])), out / "shapes_captioned.png")
        written += [out / "shapes_drawn.png", out / "shapes_captioned.png"]
        lines += [
            f"shapes_drawn #{i}: asked {p!r}  correct: {s['correct']}"
            for i, (p, s) in enumerate(zip(a["prompts"], a["image_scores"], strict=True))
        ]
        lines += [
            f"shapes_captioned #{i}: wrote {c!r}  truth {t!r}  correct: {s['correct']}"
            for i, (c, t, s) in enumerate(
                zip(a["captions"], a["truths"], a["caption_scores"], strict=True)
            )
        ]
    if "captions" in artifacts:
        a = artifacts["captions"]
        save_image(Image.fromarray(image_grid(a["pictures"])), out / "captioned.png")
        written.append(out / "captioned.png")
        lines += [
            f"captioned #{i}: wrote {c!r}  CIDEr-D {s:.3f}  references {r}"
            for i, (c, r, s) in enumerate(
                zip(a["captions"], a["references"], a["scores"], strict=True)
            )
        ]
    if "images" in artifacts:
        a = artifacts["images"]
        save_image(
            Image.fromarray(image_grid([to_uint8(x) for x in a["drawn"]])), out / "drawn.png"
        )
        written.append(out / "drawn.png")
        lines += [f"drawn #{i}: {p!r}" for i, p in enumerate(a["prompts"])]
    if lines:
        (out / "captions.txt").write_text("\n".join(lines) + "\n")
        written.append(out / "captions.txt")
    return written


@dataclasses.dataclass
class Evaluation:
    step: int
    metrics: dict  # "suite/metric" -> value
    path: epath.Path  # the JSON file written
    artifacts: dict  # suite -> what it drew or wrote (see save_artifacts)


def evaluate(workdir, suites, step=None, ema=False, **overrides) -> Evaluation:
    """Runs the suites on a run's checkpoint; writes DIR/eval/STEP.json and DIR/eval/STEP/.
    `overrides` are the flags of OVERRIDES (None: the run's eval config)."""
    model, cfg, step = load_trained(workdir, use_ema=ema, step=step)
    cfg = eval_settings(cfg)
    for flag, value in overrides.items():
        if value is not None:
            cfg.eval[OVERRIDES[flag]] = value
    evaluator = Evaluator(cfg, model, step=step)
    metrics = evaluator.run(suites)
    path = result_path(workdir, step, ema)
    write_results(path, step, ema, metrics, evaluator.settings, evaluator.seconds)
    if evaluator.artifacts:
        save_artifacts(evaluator.artifacts, path.with_suffix(""))
    return Evaluation(step, metrics, path, evaluator.artifacts)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=cli.DefaultsHelpFormatter
    )
    parser.add_argument(
        "--workdir", required=True, help="a training run's directory (or an exported .safetensors)"
    )
    parser.add_argument(
        "--suite", required=True, help="comma-separated: shapes, text, diffusion, captions, images"
    )
    parser.add_argument("--step", type=int, default=None, help="default: the newest checkpoint")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    group = parser.add_argument_group(
        "overrides of the run's eval config section (each absent one: the run's eval.* value)"
    )
    group.add_argument("--num", type=int, help="held-out examples per suite")
    group.add_argument("--batch_size", type=int, help="examples per batch")
    group.add_argument("--seed", type=int, help="the noise and sampling of every suite")
    group.add_argument("--steps", type=int, help="denoising steps of the generating suites")
    group.add_argument("--cfg_scale", type=float, help="classifier-free guidance")
    group.add_argument("--text_path", help="text suite: a held-out .txt / .jsonl file")
    group.add_argument("--data_path", help="captions/images suites: an ImageFolder directory")
    group.add_argument("--inception_weights", help="FID: pt_inception-2015-12-05-6726825d.pth")
    group.add_argument("--clip_weights", help="CLIP score: a Hugging Face CLIP directory")
    args = parser.parse_args(argv)
    from transfusion_jax.evaluation.suites import SUITES

    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    unknown = [s for s in suites if s not in SUITES]
    if not suites or unknown:
        parser.error(f"--suite {args.suite}: each must be one of {', '.join(SUITES)}")
    for flag in ("num", "batch_size", "steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} {value}: must be at least 1")
    for flag in ("inception_weights", "clip_weights", "text_path", "data_path"):
        value = getattr(args, flag)
        if value and not as_path(value).exists():
            parser.error(f"--{flag} {value}: no such file or directory")
    overrides = {flag: getattr(args, flag) for flag in OVERRIDES}
    try:
        result = evaluate(args.workdir, suites, args.step, args.ema, **overrides)
    except (FileNotFoundError, ValueError, RunError) as e:
        parser.exit(2, f"error: {e}\n")
    for name, value in result.metrics.items():
        print(f"{name}={_number(value)}")
    print(f"wrote {result.path}", file=sys.stderr)


def _number(value) -> str:
    return f"{value:.6g}" if isinstance(value, float | np.floating) else str(value)


if __name__ == "__main__":
    main()
