"""Transfusion against Chameleon at equal training FLOPs (the paper's Table 3 and its scaling
figure): the same transformer, the same data in the same order, images as diffused patches or as
VQ code tokens.

  python -m experiments.compare_chameleon --scale cpu --out experiments/results/chameleon
  python -m experiments.compare_chameleon --scale gpu --out runs/chameleon --data FOLDER \
      --vae KL_VAE_WORKDIR --vq VQ_WORKDIR
  python -m experiments.compare_chameleon --scale cpu --out DIR --dry_run

For each model size it trains both methods through the training CLI (`model.image_repr`
"continuous" and "discrete"), scoring held-out suites every `train.eval_every` steps along the way,
then scores the last step with `python -m transfusion_jax.evaluate` at guidance 5 (the paper's for
this comparison). Rows hold the same documents (captions first 80% of the time, the same caption
drop, text mixed 1:1). At the cpu scale an image takes the same positions either way (2x2
patches of a 16 px image, or the 8x8 codes of a tokenizer that downsamples by 2), so equal steps
are nearly equal FLOPs; at the gpu scale, as in the paper, a 256 px image is 256 patches (8x
latents, 2x2 patches) against 1,024 codes (a tokenizer downsampling by 8). Every run logs its
cumulative `train_flops` (6 N D plus attention, counted alike) and the curves are drawn against
it. The cpu scale first trains its VQ tokenizer (configs/vq_tiny.py).

Writes OUT/results.csv (every evaluation point: method, size, step, train_flops, metric, value),
OUT/table.md (the paper's Table 3 layout, our final scores with the paper's 7B figures beside, and
the FLOPs ratio at which Transfusion reaches Chameleon's final score, the paper's "parity at 1/34
of the FLOPs", where the curves allow) and OUT/flops.png (each metric against training FLOPs, one
colour per method, one line style per size). Running it again skips finished runs and resumes
unfinished ones.
"""

if __name__ == "__main__" and not __package__:
    # Run as a file (python experiments/compare_chameleon.py): run it again as the module, with the
    # repository root importable, so that its package imports resolve from any directory.
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = os.pathsep.join(filter(None, (_root, os.environ.get("PYTHONPATH"))))
    _argv = [sys.executable, "-m", "experiments.compare_chameleon", *sys.argv[1:]]
    os.execve(sys.executable, _argv, dict(os.environ, PYTHONPATH=_path))


import argparse
import csv
import dataclasses
import json
import pathlib
import shlex
import sys
import time

from experiments.runs import (
    add_run_flags,
    evaluate_cli,
    parse_sets,
    run_logged,
    train_and_score,
    train_cli,
)
from transfusion_jax.config import CFG_SCALE_CHAMELEON_COMPARISON

METHODS = ("transfusion", "chameleon")

# metric -> (label, True when higher is better); the ones both methods have
METRICS = {
    "shapes/text_to_image_accuracy": ("t2i acc", True),
    "shapes/text_to_image_colors": ("t2i colours", True),
    "shapes/text_to_image_shapes": ("t2i shapes", True),
    "shapes/captioning_accuracy": ("caption acc", True),
    "captions/cider": ("CIDEr", True),
    "captions/nll": ("caption nll", False),
    "images/fid": ("FID", False),
    "images/clip_score": ("CLIP", True),
    "text/bits_per_byte": ("text bpb", False),
}
CLAIM = (
    "At equal compute Transfusion beats Chameleon on every metric: FID parity at ~1/34 of the "
    "FLOPs, captioning parity at 21.8%, text parity at ~50-60%; 7B: FID 16.8 vs 29.6, CIDEr "
    "27.2 vs 18.0."
)


@dataclasses.dataclass(frozen=True)
class Scale:
    config: str  # the base config (a shipped name)
    overrides: dict  # for both methods
    sizes: dict  # size name -> overrides
    steps: int
    suites: str  # the final evaluation's suites (both methods)
    discrete_patch_size: int  # the tokenizer's downsampling: one code per window of this side
    num: int = 64
    sampling_steps: int = 50


CPU = Scale(
    config="tiny",
    overrides={
        "data.image_size": 16,
        "image.patch_size": 2,
        "image.max_images": 0,
        "patch.kind": "linear",  # the paper's main variant
        "data.text_ratio": 1.0,
        "eval.num_examples": 32,
        "eval.cfg_scale": CFG_SCALE_CHAMELEON_COMPARISON,
    },
    sizes={
        "d64x2": {"model.d_model": 64, "model.depth": 2, "model.num_heads": 2},
        "d128x4": {},
    },
    steps=1500,
    suites="shapes,captions,text",
    discrete_patch_size=2,
)

GPU = Scale(
    config="paper:0.16b",
    overrides={
        "model.vocab_size": 384,
        "data.tokenizer": "bytes",
        "data.source": "imagefolder",
        "data.seq_len": 2048,  # Chameleon's 1,024 codes per 256 px image, and a caption
        "data.text_ratio": 1.0,
        "train.batch_size": 32,
        "optimizer.warmup_steps": 1000,
        "train.checkpoint_every": 2000,
        "eval.cfg_scale": CFG_SCALE_CHAMELEON_COMPARISON,
    },
    sizes={"0.16b": {}, "0.37b": {"__config": "paper:0.37b"}},
    steps=20_000,
    suites="captions,text,images",
    discrete_patch_size=8,
)


def method_overrides(method: str, scale_name: str, args) -> dict:
    """What makes a run Transfusion or Chameleon at a scale."""
    if method == "transfusion":
        suites = (
            "shapes,captions,text,diffusion" if scale_name == "cpu" else "captions,text,diffusion"
        )
        extra = {"data.latents": "vae", "image.vae_path": args.vae} if scale_name == "gpu" else {}
        return {"train.eval_suites": suites, **extra}
    suites = "shapes,captions,text" if scale_name == "cpu" else "captions,text"
    scale = CPU if scale_name == "cpu" else GPU
    return {
        "model.image_repr": "discrete",
        "data.latents": "pixels",
        "image.vae_path": args.vq or str(tokenizer_dir(args)),
        "image.patch_size": scale.discrete_patch_size,
        "image.latent_size": 0,
        "image.latent_channels": 0,
        "train.eval_suites": suites,
    }


def tokenizer_dir(args) -> pathlib.Path:
    return pathlib.Path(args.out).resolve() / "tokenizer"


def tokenizer_command(args) -> list:
    """The cpu scale's VQ tokenizer: configs/vq_tiny.py (16 px shapes, 8x8 codes of 512)."""
    return [
        sys.executable,
        "-m",
        "transfusion_jax.train_vae",
        "--config",
        "vq_tiny",
        "--workdir",
        str(tokenizer_dir(args)),
        f"--config.train.num_steps={args.tokenizer_steps}",
    ]


def train_command(scale: Scale, scale_name, size: str, method: str, workdir, args) -> list:
    sizes = dict(scale.sizes[size])
    config = sizes.pop("__config", scale.config)
    steps = args.steps or scale.steps
    overrides = {
        **scale.overrides,
        "train.num_steps": steps,
        "train.eval_every": max(1, steps // 5),
        "train.checkpoint_every": max(1, steps // 5),
        "data.text_path": args.text,
        **({"data.path": args.data} if scale_name == "gpu" else {}),
        **sizes,
        **method_overrides(method, scale_name, args),
        **parse_sets(args.set),
    }
    return train_cli(config, workdir, overrides)


def evaluate_command(scale: Scale, workdir, args) -> list:
    num, steps = args.num or scale.num, args.sampling_steps or scale.sampling_steps
    suites = args.suites or scale.suites
    return evaluate_cli(workdir, suites, num, steps, CFG_SCALE_CHAMELEON_COMPARISON, args)


# -- results -----------------------------------------------------------------------------------


def evaluation_points(workdir: pathlib.Path, method: str, size: str) -> list[dict]:
    """Every scored point of a run with the run's training FLOPs at that step (they grow
    linearly with the step): the training-time suites (`source` "training": one sample size all
    along, the curves) and the evaluate command's scores of the last step ("final": the table)."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").open() if line.strip()]
    per_step = next(
        (r["train_flops"] / r["step"] for r in records if r.get("train_flops") and r["step"]), 0.0
    )
    points = []
    for record in records:
        for key, value in record.items():
            metric = key.removeprefix("eval/")
            if key.startswith("eval/") and metric in METRICS:
                points.append(("training", record["step"], metric, value))
    for path in sorted((workdir / "eval").glob("*.json")):
        if not path.stem.isdigit():  # STEP-ema.json: the EMA weights' scores, not compared here
            continue
        for metric, value in json.loads(path.read_text()).get("metrics", {}).items():
            if metric in METRICS:
                points.append(("final", int(path.stem), metric, value))
    return [
        {"method": method, "size": size, "source": source, "step": step,
         "train_flops": step * per_step, "metric": metric, "value": value}
        for source, step, metric, value in sorted(points)
    ]  # fmt: skip


def parity_flops(curve, target: float, higher: bool) -> tuple[float, bool] | None:
    """(the training FLOPs at which a curve of (flops, value) first reaches `target`, linearly
    interpolated between evaluations; True when that is only an upper bound, because the first
    evaluation already reaches it), or None if the curve never does."""
    better = (lambda v: v >= target) if higher else (lambda v: v <= target)
    previous = None
    for flops, value in sorted(curve):
        if better(value):
            if previous is None:
                return flops, True
            f0, v0 = previous
            return f0 + (target - v0) / (value - v0) * (flops - f0), False
        previous = (flops, value)
    return None


def _last(rows: list[dict]) -> dict:
    """(method, size, metric) -> the row of its last step."""
    last = {}
    for row in sorted(rows, key=lambda r: r["step"]):
        last[row["method"], row["size"], row["metric"]] = row
    return last


def _first(rows: list[dict], key: tuple) -> float | None:
    """The value of a (method, size, metric) series at its first step."""
    series = sorted((r["step"], r["value"]) for r in rows
                    if (r["method"], r["size"], r["metric"]) == key)  # fmt: skip
    return series[0][1] if series else None


def write_table(out: pathlib.Path, scale_name: str, sizes, rows: list[dict]) -> None:
    training = [r for r in rows if r["source"] == "training"]
    final = _last(training) | _last([r for r in rows if r["source"] == "final"])
    curves = {}  # (method, size, metric) -> [(flops, value)] of the training-time suites
    for row in training:
        key = (row["method"], row["size"], row["metric"])
        curves.setdefault(key, []).append((row["train_flops"], row["value"]))
    metrics = [m for m in METRICS if any(k[2] == m for k in final)]
    header = ["size", "method", "train FLOPs"] + [METRICS[m][0] for m in metrics]
    lines = [f"# Transfusion vs Chameleon ({scale_name} scale)", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for size in sizes:
        for method in METHODS:
            cells = [size, method]
            flops = [row["train_flops"] for k, row in final.items() if k[:2] == (method, size)]
            cells.append(f"{max(flops):.3g}" if flops else "—")
            for m in metrics:
                row = final.get((method, size, m))
                cells.append("—" if row is None else f"{row['value']:.4g}")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Scores of the last step by the evaluate command (the training-time suites' "
              "where it did not run that suite).", "", f"The paper: {CLAIM}", "",
              "Parity, ours: the FLOPs at which Transfusion's curve reaches Chameleon's last "
              "score on the same curve sample, as a share of Chameleon's FLOPs:"]  # fmt: skip
    chameleon_last = _last(training)
    for size in sizes:
        for m in metrics:
            chameleon = chameleon_last.get(("chameleon", size, m))
            curve = curves.get(("transfusion", size, m))
            if chameleon is None or not curve:
                continue
            label, higher = METRICS[m]
            start, end = _first(training, ("chameleon", size, m)), chameleon["value"]
            if not (start < end if higher else start > end):
                lines.append(
                    f"- {size}, {label}: no parity read: Chameleon's score did not improve over "
                    f"its run ({start:.4g} -> {end:.4g})"
                )
                continue
            reached = parity_flops(curve, chameleon["value"], higher)
            share = None if reached is None else reached[0] / chameleon["train_flops"]
            if reached is None:
                verdict = "does not reach it within its run"
            elif reached[1]:
                verdict = (
                    f"reaches it by its first evaluation, at {share:.1%} of Chameleon's FLOPs "
                    "(a bound)"
                )
            else:
                verdict = f"reaches it at {share:.1%} of Chameleon's FLOPs"
            lines.append(
                f"- {size}, {label}: Chameleon ends at {chameleon['value']:.4g}; Transfusion "
                f"{verdict}"
            )
    lines += ["", "Arrows of better: " + ", ".join(
        f"{METRICS[m][0]} {'↑' if METRICS[m][1] else '↓'}" for m in metrics)]  # fmt: skip
    (out / "table.md").write_text("\n".join(lines) + "\n")


def plot_flops(out: pathlib.Path, sizes, rows: list[dict]) -> None:
    """One panel per metric: value against training FLOPs, colour = method, style = size; lines
    join the training-time evaluations, a star marks the evaluate command's final score."""
    from matplotlib.figure import Figure

    metrics = [m for m in METRICS if any(r["metric"] == m for r in rows)]
    if not metrics:
        return
    columns = min(4, len(metrics))
    lines_of = ("-", "--", ":", "-.")
    colours = {"transfusion": "tab:blue", "chameleon": "tab:orange"}
    grid = (-(-len(metrics) // columns), columns)
    figure = Figure(figsize=(4 * grid[1], 3.2 * grid[0]), layout="constrained")
    axes = figure.subplots(*grid, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics, strict=False):
        for method in METHODS:
            for style, size in zip(lines_of, sizes, strict=False):
                for source in ("training", "final"):
                    points = sorted(
                        (r["train_flops"], r["value"])
                        for r in rows
                        if (r["method"], r["size"], r["metric"], r["source"])
                        == (method, size, metric, source)
                    )
                    if not points:
                        continue
                    xs, ys = zip(*points, strict=True)
                    if source == "training":
                        ax.plot(xs, ys, style, marker="o", ms=3, color=colours[method],
                                label=f"{method} {size}")  # fmt: skip
                    else:
                        ax.plot(xs, ys, "*", ms=9, color=colours[method])
        label, higher = METRICS[metric]
        ax.set_title(f"{label} ({'higher' if higher else 'lower'} is better)")
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    labelled = [ax for ax in axes if ax.get_legend_handles_labels()[0]]
    if labelled:  # a metric scored only at the end has a star and no line
        labelled[0].legend(fontsize="x-small")
    figure.savefig(out / "flops.png", dpi=110)


def write_results(out: pathlib.Path, scale_name: str, sizes, runs: dict) -> None:
    rows = []
    for (method, size), workdir in runs.items():
        if (workdir / "metrics.jsonl").is_file():
            rows += evaluation_points(workdir, method, size)
    with (out / "results.csv").open("w", newline="") as f:
        fields = ["method", "size", "source", "step", "train_flops", "metric", "value"]
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    write_table(out, scale_name, sizes, rows)
    plot_flops(out, sizes, rows)


# -- main --------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--scale", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--out", required=True, help="the comparison's folder")
    parser.add_argument("--sizes", default="", help="comma-separated subset of the model sizes")
    parser.add_argument("--tokenizer_steps", type=int, default=2000, help="cpu: VQ steps")
    parser.add_argument("--vq", default="", help="Chameleon's VQ tokenizer (cpu: trained here)")
    add_run_flags(parser)
    args = parser.parse_args(argv)
    if args.scale == "gpu" and not args.dry_run and not (args.vae and args.vq):
        parser.error(
            "--scale gpu needs --vae (python -m transfusion_jax.train_vae --config vae_paper ...) "
            "and --vq (python -m transfusion_jax.train_vae --config vq_paper ...)"
        )
    parse_sets(args.set)  # a malformed --set stops here, before anything runs
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    scale = {"cpu": CPU, "gpu": GPU}[args.scale]
    sizes = list(scale.sizes)
    if args.sizes:
        unknown = sorted(set(args.sizes.split(",")) - set(sizes))
        if unknown:
            names = ", ".join(sizes)
            raise SystemExit(f"error: --sizes {','.join(unknown)}: the sizes are {names}")
        sizes = [s for s in sizes if s in args.sizes.split(",")]
    out = pathlib.Path(args.out).resolve()
    runs = {(m, s): out / "runs" / f"{m}-{s}" for s in sizes for m in METHODS}
    steps = args.steps or scale.steps
    started = time.monotonic()
    if args.scale == "cpu" and not args.vq:
        command = tokenizer_command(args)
        if args.dry_run:
            print(f"# the VQ tokenizer\n{shlex.join(command)}")
        elif not (tokenizer_dir(args) / "checkpoints" / str(args.tokenizer_steps)).is_dir():
            tokenizer_dir(args).mkdir(parents=True, exist_ok=True)
            print(f"VQ tokenizer: training {args.tokenizer_steps} steps", flush=True)
            run_logged(command, tokenizer_dir(args) / "train.log", "training the tokenizer")
    for i, ((method, size), workdir) in enumerate(runs.items(), 1):
        train = train_command(scale, args.scale, size, method, workdir, args)
        score = evaluate_command(scale, workdir, args)
        if args.dry_run:
            print(f"# {method} {size}\n{shlex.join(train)}\n{shlex.join(score)}")
            continue
        suites = args.suites or scale.suites
        train_and_score(train, score, workdir, steps, suites, f"[{i}/{len(runs)}] {workdir.name}")
    if args.dry_run:
        return
    write_results(out, args.scale, sizes, runs)
    print(f"{len(runs)} runs in {(time.monotonic() - started) / 60:.1f} min; wrote {out}/table.md")


if __name__ == "__main__":
    main()
