"""The main job: train the tiny model on the built-in shapes data, then draw and caption.

  python -m transfusion_jax.quickstart --workdir workdirs/quickstart [--config.train.num_steps=N]

1. trains `configs/tiny.py` on the shapes data (resumes if the directory has a checkpoint);
2. draws one image for each of `--num` held-out captions (text -> image) into
   DIR/samples/grid.png and 000.png, ..., and scores each with the exact shapes scorer;
3. captions `--num` held-out shapes images (image -> text) and scores the captions;
4. writes DIR/samples/report.json and DIR/samples/captions.txt and prints the accuracies.
"""

import json
import pathlib

import numpy as np
from absl import flags
from ml_collections import config_flags
from PIL import Image

from transfusion_jax import cli
from transfusion_jax.config import config_path
from transfusion_jax.data import shapes
from transfusion_jax.data.images import array_to_image, to_uint8
from transfusion_jax.inference import Pipeline, image_grid
from transfusion_jax.train import train

HELD_OUT_SEED = 987_654  # scenes drawn with another seed than training's


def evaluate(workdir, num: int, steps: int, cfg_scale: float, seed: int = 0) -> dict:
    pipe = Pipeline.from_workdir(workdir)
    cfg, step, sampler = pipe.cfg, pipe.step, pipe.options().sampler
    scenes = [shapes.scene_for_index(i, HELD_OUT_SEED) for i in range(num)]
    prompts = [shapes.caption(s) for s in scenes]
    images = pipe.text_to_image(prompts, steps=steps, cfg_scale=cfg_scale, seed=seed)
    drawn = [np.asarray(image) for image in images]
    image_scores = [
        shapes.score_image(image, scene) for image, scene in zip(drawn, scenes, strict=True)
    ]

    size = cfg.data.image_size
    truth = [shapes.scene_for_index(i, HELD_OUT_SEED + 1) for i in range(num)]
    pictures = np.stack([array_to_image(shapes.render(s, size)) for s in truth])
    captions = pipe.caption(pictures, max_new_tokens=cfg.data.max_caption_tokens + 2, seed=seed)
    caption_scores = [shapes.score_caption(c, s) for c, s in zip(captions, truth, strict=True)]

    out = pathlib.Path(workdir) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(drawn):
        Image.fromarray(image).save(out / f"{i:03d}.png")
    Image.fromarray(image_grid(drawn)).save(out / "grid.png")
    Image.fromarray(image_grid([to_uint8(p) for p in pictures])).save(out / "captioned.png")
    lines = [
        f"{i:03d}.png  asked: {shapes.caption(s)}  correct: {r['correct']}"
        for i, (s, r) in enumerate(zip(scenes, image_scores, strict=True))
    ]
    lines += [
        f"captioned.png #{i}: wrote {c!r}  truth: {shapes.caption(s)}  correct: {r['correct']}"
        for i, (c, s, r) in enumerate(zip(captions, truth, caption_scores, strict=True))
    ]
    (out / "captions.txt").write_text("\n".join(lines) + "\n")

    def rate(scores, key):
        return float(np.mean([s[key] for s in scores]))

    report = {
        "step": step,
        "text_to_image_accuracy": rate(image_scores, "correct"),
        "text_to_image_aspects": {k: rate(image_scores, k) for k in shapes.ASPECTS},
        "captioning_accuracy": rate(caption_scores, "correct"),
        "captioning_parsed": rate(caption_scores, "parsed"),
        "num": num,
        "sampler": sampler,
        "steps": steps,
        "cfg_scale": cfg_scale,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def define_flags() -> None:
    """The command's flags, defined only when it runs (importing the module defines none)."""
    config_flags.DEFINE_config_file(
        "config", str(config_path("tiny")), "The config to train (a file or a shipped name)."
    )
    flags.DEFINE_string("workdir", "workdirs/quickstart", "Where the run is written.")
    flags.DEFINE_integer("train_steps", 0, "Training steps; 0 = the config's.")
    flags.DEFINE_integer("num", 16, "Held-out captions to draw and images to caption.")
    flags.DEFINE_integer("steps", 100, "Denoising steps per image.")
    flags.DEFINE_float("cfg_scale", 3.0, "Classifier-free guidance scale.")


def main():
    f = flags.FLAGS
    cfg = f.config
    if f.train_steps:
        cfg.train.num_steps = f.train_steps
    train(cfg, f.workdir)
    num, workdir = f.num, f.workdir
    report = evaluate(workdir, num, f.steps, f.cfg_scale)
    out = pathlib.Path(workdir) / "samples"
    print(
        f"text -> image: {100 * report['text_to_image_accuracy']:.0f}% of {num} images "
        f"show exactly their caption ({out / 'grid.png'})"
    )
    print(
        f"image -> text: {100 * report['captioning_accuracy']:.0f}% of {num} captions "
        f"are exactly right ({out / 'captions.txt'}, pictures in {out / 'captioned.png'})"
    )


if __name__ == "__main__":
    define_flags()
    cli.run(main)
