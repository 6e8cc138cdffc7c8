"""Sample from a trained run: text -> image, caption an image, or continue a text.

  python -m transfusion_jax.sample --workdir DIR --prompt "a small red circle above a large blue
      square" --num 8 --out OUTDIR          # writes OUTDIR/grid.png and OUTDIR/000.png, ...
  python -m transfusion_jax.sample --workdir DIR --image photo.png    # prints the caption last
  python -m transfusion_jax.sample --workdir DIR --text "a large"     # prints the continuation

Loads the newest checkpoint that restores (`--step N` for another, `--ema` for the EMA weights)
through `transfusion_jax.Pipeline`, and shows the progress of the denoising steps. Flags are
checked before the model loads.

Sampling runs on every local device (`--mesh DATA,FSDP,TENSOR` to choose the split): only the
weights it uses are read, each straight into its shards, and the KV cache is split by heads, so
a model too large for one device samples on one multi-GPU host or a TPU slice.
"""

import argparse
import math
import sys

import jax
from PIL import Image

from transfusion_jax import cli
from transfusion_jax.checkpoint import Checkpointer
from transfusion_jax.config import CFG_SCALE_ABLATION
from transfusion_jax.data.tokenizer import make_tokenizer
from transfusion_jax.diffusion_solvers import METHODS
from transfusion_jax.export import exported_config, is_export
from transfusion_jax.inference import SAMPLERS_FOR, Pipeline, auto_mesh_shape, image_grid
from transfusion_jax.paths import as_path, save_image
from transfusion_jax.sharding import make_mesh
from transfusion_jax.workdir import RunError


def check_arguments(args, parser) -> None:
    """Refuses arguments that cannot work before the model is loaded, naming the flag: they
    need only DIR/config.json and the tokenizer."""
    if sum(x is not None for x in (args.prompt, args.image, args.text)) != 1:
        parser.error(
            "give exactly one of --prompt (text -> image), --image (captioning) or --text "
            "(a text continuation, with images where the model opens one)"
        )
    for flag, value in (("--num", args.num), ("--steps", args.steps)):
        if value < 1:
            parser.error(f"{flag} {value}: must be at least 1")
    if args.max_new_tokens < 1:
        parser.error(f"--max_new_tokens {args.max_new_tokens}: must be at least 1")
    if not math.isfinite(args.cfg_scale) or args.cfg_scale < 0:
        parser.error(f"--cfg_scale {args.cfg_scale}: must be finite and >= 0 (1 = no guidance)")
    for flag in ("temperature", "top_k", "image_temperature", "image_top_k"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag} {getattr(args, flag)}: must be >= 0")
    if args.step is not None and args.step < 0:
        parser.error(f"--step {args.step}: must be a checkpoint's step number")
    cfg = _stored_config(args, parser)
    objective = cfg["diffusion"]["objective"]
    valid = SAMPLERS_FOR[objective]
    args.sampler = args.sampler or valid[0 if objective == "epsilon" else 1]
    if args.sampler not in valid:
        parser.error(
            f"--sampler {args.sampler}: a model trained with diffusion.objective={objective!r} "
            f"samples with {' or '.join(valid)}"
        )
    if (
        args.sampler in ("ddpm", "ddim")
        and not 2 <= args.steps <= cfg["diffusion"]["num_timesteps"]
    ):
        parser.error(
            f"--steps {args.steps}: {args.sampler} needs 2 to "
            f"{cfg['diffusion']['num_timesteps']} steps (diffusion.num_timesteps)"
        )
    image_positions = (cfg["image"]["latent_size"] // cfg["image"]["patch_size"]) ** 2 + 2
    seq_len = cfg["data"]["seq_len"]
    if args.image is not None:
        if not as_path(args.image).is_file():
            parser.error(f"--image {args.image}: no such file")
        needed, what = 2 + image_positions + args.max_new_tokens, "--max_new_tokens"
    elif args.prompt is not None:
        tokens = make_tokenizer(cfg["data"]["tokenizer"]).encode(args.prompt)
        needed, what = 1 + len(tokens) + image_positions, "--prompt"
    else:
        tokens = make_tokenizer(cfg["data"]["tokenizer"]).encode(args.text)
        needed, what = 1 + len(tokens) + args.max_new_tokens, "--text with --max_new_tokens"
    if needed > seq_len:
        parser.error(
            f"{what}: the context would need {needed} positions, but the model was trained on "
            f"rows of {seq_len} (data.seq_len); shorten it"
        )
    kv_heads = cfg["model"].get("num_kv_heads") or cfg["model"]["num_heads"]
    args.mesh_shape = _mesh_shape(args.mesh, len(jax.local_devices()), kv_heads, parser)


def _mesh_shape(value: str, devices: int, kv_heads: int, parser) -> tuple[int, int, int]:
    """--mesh as (data, fsdp, tensor), checked against the local devices."""
    if value == "auto":
        return auto_mesh_shape(devices, kv_heads)
    fix = f"give DATA,FSDP,TENSOR whose product is {devices}, one of them may be -1 (the rest)"
    try:
        shape = tuple(int(x) for x in value.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or any(x == 0 or x < -1 for x in shape) or shape.count(-1) > 1:
        parser.error(f"--mesh {value}: not auto or three sizes; {fix}")
    known = math.prod(x for x in shape if x != -1)
    if (devices % known) if -1 in shape else (known != devices):
        parser.error(f"--mesh {value}: there are {devices} local devices; {fix}")
    return shape


def _stored_config(args, parser) -> dict:
    """The config of the checkpoint that will load (JSON only, no model): the one stored with
    it, else DIR/config.json; or an exported file's."""
    if is_export(args.workdir):
        if args.ema or args.step is not None:
            parser.error(
                f"--workdir {args.workdir}: an export holds one set of weights; drop --ema and "
                "--step"
            )
        try:
            return exported_config(args.workdir)
        except ValueError as e:
            parser.error(str(e))
    checkpoints = Checkpointer(as_path(args.workdir) / "checkpoints", None, read_only=True)
    try:
        steps = checkpoints.manager.all_steps()
        step = args.step if args.step is not None else max(steps, default=None)
        stored = None if step is None else checkpoints.config_of(step)
    finally:
        checkpoints.close()
    if stored is None:
        parser.error(f"--workdir {args.workdir}: no checkpoint (is it a training run?)")
    return stored


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=cli.DefaultsHelpFormatter
    )
    parser.add_argument(
        "--workdir", required=True, help="a training run's directory, or an exported .safetensors"
    )
    parser.add_argument("--prompt", help="text -> image: the caption to draw (may be empty)")
    parser.add_argument("--image", help="image -> text: a picture to caption")
    parser.add_argument("--text", help="a text to continue (images where the model opens one)")
    parser.add_argument("--num", type=int, default=8, help="images to draw for --prompt")
    parser.add_argument(
        "--out", default="DIR/samples", help="where to write images (DIR: the --workdir)"
    )
    parser.add_argument(
        "--cfg_scale",
        "--cfg-scale",
        type=float,
        default=CFG_SCALE_ABLATION,
        help="classifier-free guidance (the paper: 3 in its ablations, 5 against Chameleon)",
    )
    parser.add_argument("--steps", type=int, default=250, help="denoising steps")
    parser.add_argument(
        "--sampler",
        default=None,
        choices=METHODS,
        help="ddpm/ddim (epsilon models), euler/heun (flow models); default ddpm or heun",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the noise and the sampling")
    parser.add_argument(
        "--max_new_tokens",
        "--max-new-tokens",
        type=int,
        default=64,
        help="the most tokens a caption (--image) or a continuation (--text) gets",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (--text)")
    parser.add_argument("--top_k", type=int, default=0, help="0 = no top-k filter (--text)")
    parser.add_argument("--top_p", type=float, default=1.0, help="1 = no nucleus filter (--text)")
    parser.add_argument(
        "--image_temperature",
        type=float,
        default=1.0,
        help="discrete (VQ token) runs: temperature of the image codes (0 = greedy)",
    )
    parser.add_argument(
        "--image_top_k",
        type=int,
        default=0,
        help="discrete (VQ token) runs: sample image codes among the k likeliest (0 = all)",
    )
    parser.add_argument("--ema", action="store_true", help="use the EMA weights")
    parser.add_argument(
        "--step", type=int, default=None, help="the checkpoint to load (None: the newest)"
    )
    parser.add_argument(
        "--mesh",
        default="auto",
        metavar="DATA,FSDP,TENSOR",
        help="how the local devices split the work (one size may be -1: the "
        "rest). auto uses all of them: tensor as many as split whole KV heads (the attention "
        "weights and the KV cache, which grows with the context, split by heads: what lets a "
        "large model's cache fit), fsdp the rest (the other weights split along the width, "
        "the images or prompts by rows)",
    )
    args = parser.parse_args(argv)
    check_arguments(args, parser)

    try:
        mesh = make_mesh(*args.mesh_shape, jax.local_devices())
        pipe = Pipeline.from_workdir(args.workdir, ema=args.ema, step=args.step, mesh=mesh)
        pipe.options(sampler=args.sampler, cfg_scale=args.cfg_scale, steps=args.steps)
    except (FileNotFoundError, ValueError, RunError) as e:
        parser.exit(2, f"error: {e}\n")
    print(f"loaded {args.workdir} at step {pipe.step}", file=sys.stderr)
    run = as_path(args.workdir)
    run = run.parent if is_export(run) else run  # an export: the folder holding it
    out = run / "samples" if args.out == "DIR/samples" else as_path(args.out)
    if args.image is not None:
        print(pipe.caption(args.image, max_new_tokens=args.max_new_tokens, seed=args.seed)[0])
        return
    if args.text is not None:
        parts = pipe.generate(
            args.text,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            steps=args.steps,
            cfg_scale=args.cfg_scale,
            sampler=args.sampler,
            seed=args.seed,
            image_temperature=args.image_temperature,
            image_top_k=args.image_top_k,
        )
        for i, part in enumerate(parts):
            if isinstance(part, str):
                print(part, end="")
            else:
                out.mkdir(parents=True, exist_ok=True)
                save_image(part, out / f"text_{i:03d}.png")
                print(f"[image: {out / f'text_{i:03d}.png'}]", end="")
        print()
        return
    images = pipe.text_to_image(
        args.prompt,
        num_per_prompt=args.num,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        sampler=args.sampler,
        seed=args.seed,
        progress=True,
        image_temperature=args.image_temperature,
        image_top_k=args.image_top_k,
    )
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_image(image, out / f"{i:03d}.png")
    save_image(Image.fromarray(image_grid(images)), out / "grid.png")
    print(f"wrote {len(images)} images and {out / 'grid.png'}")


if __name__ == "__main__":
    main()
