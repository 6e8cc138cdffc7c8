"""The main job: train the tiny model on the built-in shapes data, then draw, caption and score.

  python -m transfusion_jax.quickstart --workdir workdirs/quickstart [--config.train.num_steps=N]

1. trains `configs/quickstart.py` (tiny, tuned for CPU minutes) on the shapes data (resumes
   if the directory has a checkpoint), evaluating the held-out diffusion loss and caption
   perplexity as it goes;
2. runs the evaluation suites (`transfusion_jax.evaluate`) on the trained model: shapes (draws
   one image for each of `--num` held-out captions and captions `--num` held-out pictures, both
   scored with the exact shapes scorer), captions (CIDEr-D), text and diffusion;
3. writes DIR/samples/: grid.png and 000.png, ... (the drawings), captioned.png (the pictures it
   captioned), scored.png (the first 16 prompts over their drawings and pictures under their
   captions, framed by the verdict), captions.txt (each prompt and caption with its verdict) and
   report.json; the metrics also go to DIR/eval/STEP.json;
4. draws the training and evaluation curves into DIR/curves.png and prints the accuracies.
"""

import json

from absl import flags
from ml_collections import config_flags
from PIL import Image

from transfusion_jax import cli
from transfusion_jax.config import config_path
from transfusion_jax.data import shapes
from transfusion_jax.evaluate import evaluate as run_suites
from transfusion_jax.inference import image_grid
from transfusion_jax.paths import as_path, save_figure, save_image
from transfusion_jax.plot import plot_runs
from transfusion_jax.scored_figure import scored_figure
from transfusion_jax.train import train

SUITES = ("shapes", "captions")  # generating; text and diffusion run with the config's sizes


def evaluate(workdir, num: int, steps: int, cfg_scale: float, seed: int = 0) -> dict:
    """The suites on the newest checkpoint; writes DIR/samples/ and returns the report. The
    text and diffusion suites use the config's sizes, as during training (so the two agree at
    the last step); `num` prompts and pictures go to the generating ones."""
    result = run_suites(workdir, ("text", "diffusion"), seed=seed)
    drawn = run_suites(workdir, SUITES, num=num, steps=steps, cfg_scale=cfg_scale, seed=seed)
    m, art = result.metrics | drawn.metrics, drawn.artifacts["shapes"]
    out = as_path(workdir) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(art["drawn"]):
        save_image(Image.fromarray(image), out / f"{i:03d}.png")
    save_image(Image.fromarray(image_grid(art["drawn"])), out / "grid.png")
    save_image(Image.fromarray(image_grid(art["pictures"])), out / "captioned.png")
    verdicts = {k: [r["correct"] for r in art[k]] for k in ("image_scores", "caption_scores")}
    drawings = zip(art["drawn"], art["prompts"], verdicts["image_scores"], strict=True)
    captionings = zip(art["pictures"], art["captions"], verdicts["caption_scores"], strict=True)
    save_figure(scored_figure(drawings, captionings), out / "scored.png")
    lines = [
        f"{i:03d}.png  asked: {p}  correct: {r['correct']}"
        for i, (p, r) in enumerate(zip(art["prompts"], art["image_scores"], strict=True))
    ]
    lines += [
        f"captioned.png #{i}: wrote {c!r}  truth: {t}  correct: {r['correct']}"
        for i, (c, t, r) in enumerate(
            zip(art["captions"], art["truths"], art["caption_scores"], strict=True)
        )
    ]
    (out / "captions.txt").write_text("\n".join(lines) + "\n")
    report = {
        "step": drawn.step,
        "text_to_image_accuracy": m["shapes/text_to_image_accuracy"],
        "text_to_image_aspects": {k: m[f"shapes/text_to_image_{k}"] for k in shapes.ASPECTS},
        "captioning_accuracy": m["shapes/captioning_accuracy"],
        "captioning_parsed": m["shapes/captioning_parsed"],
        "captioning_aspects": {k: m[f"shapes/captioning_{k}"] for k in shapes.ASPECTS},
        "by_object_count": {
            k: m[f"shapes/{k}"]
            for task in ("text_to_image", "captioning")
            for k in (f"{task}_accuracy_one_object", f"{task}_accuracy_two_objects")
            if f"shapes/{k}" in m
        },
        "metrics": m,
        "num": num,
        "steps": steps,
        "cfg_scale": cfg_scale,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def object_count_summary(report: dict, task: str) -> str:
    """What follows an accuracy in the printout: the rates of the one- and the two-object
    scenes, for the kinds the held-out scenes had, as "(one object: X%, two objects: Y%)"."""
    rates, kinds = report["by_object_count"], {"one_object": "one", "two_objects": "two"}
    parts = [
        f"{label} object{'s' * (label == 'two')}: {100 * rates[key]:.0f}%"
        for kind, label in kinds.items()
        if (key := f"{task}_accuracy_{kind}") in rates
    ]
    return f" ({', '.join(parts)})" if parts else ""


def define_flags() -> None:
    """The command's flags, defined only when it runs (importing the module defines none)."""
    config_flags.DEFINE_config_file(
        "config",
        str(config_path("quickstart")),
        "The config to train (a file or a shipped name).",
    )
    flags.DEFINE_string("workdir", "workdirs/quickstart", "Where the run is written.")
    flags.register_validator("workdir", bool, "an empty --workdir would write the run here")
    flags.DEFINE_integer("train_steps", 0, "Training steps; 0 = the config's.")
    flags.DEFINE_integer("num", 64, "Held-out captions to draw and images to caption.")
    flags.DEFINE_integer("steps", 100, "Denoising steps per image.")
    flags.DEFINE_float("cfg_scale", 3.0, "Classifier-free guidance scale.")


def main():
    f = flags.FLAGS
    cfg = f.config
    if f.train_steps:
        cfg.train.num_steps = f.train_steps
    train(cfg, f.workdir)
    num, workdir = f.num, as_path(f.workdir)
    report = evaluate(workdir, num, f.steps, f.cfg_scale)
    plot_runs([workdir], workdir / "curves.png", metrics=["headline"])
    out, m = workdir / "samples", report["metrics"]
    drawn, written = (object_count_summary(report, t) for t in ("text_to_image", "captioning"))
    print(
        f"text -> image: {100 * report['text_to_image_accuracy']:.0f}% of {num} images "
        f"show exactly their caption{drawn} ({out / 'grid.png'})"
    )
    print(
        f"image -> text: {100 * report['captioning_accuracy']:.0f}% of {num} captions "
        f"are exactly right{written}, CIDEr-D {m['captions/cider']:.2f} "
        f"({out / 'captions.txt'}, pictures in {out / 'captioned.png'})"
    )
    print(
        f"held out: diffusion loss {m['diffusion/val_loss']:.4f}, caption text "
        f"{m['text/bits_per_byte']:.3f} bits per byte; curves in {workdir / 'curves.png'}"
    )
    print(f"the first 16 of each task, marked right or wrong: {out / 'scored.png'}")


if __name__ == "__main__":
    cli.run(main, define_flags)
