"""The paper's ablations (Tables 5-8), one command per table: train every arm, score it, tabulate.

  python -m experiments.ablations --table 5 --scale cpu --out experiments/results/table5
  python -m experiments.ablations --table 6 --scale gpu --out runs/table6 --vae VAE --data FOLDER
  python -m experiments.ablations --table 7 --scale paper          # the paper's settings, printed
  python -m experiments.ablations --table 8 --scale cpu --out DIR --dry_run

Tables (PAPER.md): 5 causal vs bidirectional attention inside images (linear and U-Net patches);
6 patch size (linear and U-Net); 7 linear vs U-Net patches at several model sizes; 8 noise
limiting of image-first (captioning) examples on and off.

Each arm trains through the normal CLI (`python -m transfusion_jax.train`) into OUT/runs/ARM
(ARM-sN for seed N > 0), with held-out diffusion and text scores along the way, then is scored at
its last step by `python -m transfusion_jax.evaluate`. Running the command again skips finished
arms and resumes unfinished ones. It writes:
- OUT/results.csv: one row per arm, seed and final metric;
- OUT/table.md: the table laid out as the paper's (arms as rows, our metrics as columns, mean and
  half-range over seeds), the paper's own numbers beside ours where an arm has a counterpart, and
  the paper's trends checked against ours (a difference inside the seed spread is not a trend);
- OUT/curves.png (training and held-out metrics against steps, one curve per arm) and
  OUT/final.png (final metrics as grouped bars, seed spread as error bars).

Scales:
- `cpu`: the tiny model on the built-in shapes scenes at 16 px in pixel space, 1:1 with text from
  ../shared/data/tinyshakespeare.txt (`--text`); about an hour per table on 2 CPU cores. The
  paper's patch sizes 2/4/8 on 32x32 latents give 256/64/16 positions per image; 1/2/4 on 16 px
  images give the same counts, so table 6 runs those.
- `gpu`: a 0.16B-shape model (rows of 1024) in latent space on an image-caption folder (`--data`,
  a train_vae workdir or diffusers AutoencoderKL as `--vae`), sized for a few hours on one
  accelerator; add `--inception_weights`/`--clip_weights` for FID and CLIP score.
- `paper`: prints every arm's training command at the paper's sizes and the TPU slice it fits on
  (docs/aot_results.md), without running anything.
"""

if __name__ == "__main__" and not __package__:
    # Run as a file (python experiments/ablations.py): run it again as the module, with the
    # repository root importable, so that its package imports resolve from any directory.
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = os.pathsep.join(filter(None, (_root, os.environ.get("PYTHONPATH"))))
    _argv = [sys.executable, "-m", "experiments.ablations", *sys.argv[1:]]
    os.execve(sys.executable, _argv, dict(os.environ, PYTHONPATH=_path))


import argparse
import csv
import dataclasses
import math
import pathlib
import re
import shlex
import time

from experiments.runs import (
    add_run_flags,
    evaluate_cli,
    final_metrics,
    flag_value,
    parse_sets,
    train_and_score,
    train_cli,
)
from transfusion_jax.config import CFG_SCALE_ABLATION

# metric -> (label in tables and plots, True when higher is better)
METRICS = {
    "shapes/text_to_image_accuracy": ("t2i acc", True),
    "shapes/captioning_accuracy": ("caption acc", True),
    "captions/cider": ("CIDEr", True),
    # the caption's loss given its own image, and how much worse given another image: continuous
    # captioning measures that still separate arms whose exact scores sit at the floor
    "captions/nll": ("caption nll", False),
    "captions/image_information": ("image info", True),
    "images/fid": ("FID", False),
    "images/clip_score": ("CLIP", True),
    "diffusion/val_loss": ("diffusion loss", False),
    "text/bits_per_byte": ("text bpb", False),
    "text/perplexity": ("text ppl", False),
}


@dataclasses.dataclass(frozen=True)
class Arm:
    """One trained configuration of a table: `row` and `column` place it in the paper's layout."""

    name: str
    row: str
    column: str
    overrides: dict
    paper: dict = dataclasses.field(default_factory=dict)  # the paper's figures, by our metric
    config: str = ""  # the base config when not the scale's (table 7's model sizes)


@dataclasses.dataclass(frozen=True)
class Trend:
    """A claim of the paper: arm `better` beats arm `worse` on `metric`."""

    better: str
    worse: str
    metric: str


@dataclasses.dataclass(frozen=True)
class Scale:
    config: str  # the base config (a shipped name)
    overrides: dict  # on top of it, for every arm
    steps: dict  # table -> training steps per arm
    suites: str  # the final evaluation's suites
    patch_sizes: tuple  # table 6, smallest first
    model_sizes: dict  # table 7: size name -> (config, overrides)
    table_overrides: dict = dataclasses.field(default_factory=dict)  # table -> overrides
    num: int = 64  # held-out examples per generating suite
    sampling_steps: int = 50
    cfg_scale: float = CFG_SCALE_ABLATION  # the paper's guidance for its ablations


CPU = Scale(
    config="tiny",
    overrides={
        "data.image_size": 16,
        "image.patch_size": 2,
        "image.max_images": 0,  # as many as the row can hold
        "data.text_ratio": 1.0,
        "train.eval_suites": "diffusion,text",
        "eval.num_examples": 64,
    },
    steps={5: 1500, 6: 1000, 7: 1000, 8: 2500},
    suites="shapes,captions,text,diffusion",
    patch_sizes=(1, 2, 4),
    # a 256-position image and its caption need longer rows: as many positions per step
    table_overrides={6: {"data.seq_len": 512, "train.batch_size": 4}},
    model_sizes={
        "d64x2": ("tiny", {"model.d_model": 64, "model.depth": 2, "model.num_heads": 2}),
        "d128x4": ("tiny", {}),
        "d192x6": ("tiny", {"model.d_model": 192, "model.depth": 6, "model.num_heads": 6}),
    },
)

GPU = Scale(
    config="paper:0.16b",
    overrides={
        "model.vocab_size": 384,  # byte-level text: no tokenizer file needed
        "data.tokenizer": "bytes",
        "data.source": "imagefolder",
        "data.latents": "vae",
        "data.seq_len": 1024,
        "data.text_ratio": 1.0,
        "train.batch_size": 64,
        "optimizer.warmup_steps": 1000,
        "train.eval_suites": "diffusion,text",
        "train.checkpoint_every": 2000,
    },
    steps={5: 20_000, 6: 20_000, 7: 20_000, 8: 20_000},
    suites="captions,text,diffusion,images",
    patch_sizes=(2, 4, 8),
    model_sizes={"0.16b": ("paper:0.16b", {}), "0.37b": ("paper:0.37b", {})},
)

PAPER_SIZES = ("0.16b", "0.37b", "0.76b", "1.4b", "7b")
# The paper's own runs: printed, never trained here (250k steps, guidance 3 for ablations).
PAPER = Scale(
    config="paper:0.76b",
    overrides={},
    steps={},
    suites="captions,text,diffusion,images",
    patch_sizes=(2, 4, 8),
    model_sizes={size: (f"paper:{size}", {}) for size in PAPER_SIZES},
)

# The slice each paper size fits on at seq 4096 (docs/aot_results.md, default remat, tpu_flash).
PAPER_SLICES = {
    "0.16b": "v5p:2x2x2, 2 rows/chip: 5.3 GiB peak",
    "0.37b": "v5p:2x2x2, 2 rows/chip: 7.7 GiB peak",
    "0.76b": "v5p:2x2x2, 2 rows/chip: 10.4 GiB peak",
    "1.4b": "v5p:2x2x2, 2 rows/chip: 13.4 GiB peak; 8 rows/chip on v5p:4x4x4: 44.5 GiB",
    "7b": "v5p:4x4x4, 16 rows/chip in 4 micro-batches: 51.9 GiB peak",
}

TITLES = {
    5: "Table 5: attention inside an image, causal vs bidirectional",
    6: "Table 6: patch size",
    7: "Table 7: linear vs U-Net patch layers at several model sizes",
    8: "Table 8: noise limiting (t < 500) of image-first examples",
}
CLAIMS = {
    5: "Bidirectional beats causal: linear 2x2 FID 61.3 -> 20.3, CIDEr 12.7 -> 16.0; "
    "small effect with the U-Net (FID 16.8 -> 16.7).",
    6: "Larger patches hurt the linear layer (FID 20.3 / 25.6 / 43.5 at 2/4/8) but barely the "
    "U-Net (16.7 / 16.0 / 16.1); text metrics degrade slowly with patch size.",
    7: "The U-Net beats the linear layer at every size, most at small sizes "
    "(0.16B: FID 37.6 vs 18.8, CIDEr 6.2 vs 15.3).",
    8: "Noise limiting raises CIDEr (0.76B: 25.4 -> 29.4) and leaves the rest unchanged.",
}


def table_arms(table: int, scale: Scale) -> tuple[list[Arm], list[Trend]]:
    """The arms of a table at a scale, and the paper's trends between them."""
    unet = {"patch.kind": "unet"}
    linear = {"patch.kind": "linear"}
    if table == 5:
        paper = {
            ("linear", "causal"): {"images/fid": 61.3, "captions/cider": 12.7},
            ("linear", "bidirectional"): {"images/fid": 20.3, "captions/cider": 16.0},
            ("unet", "causal"): {"images/fid": 16.8},
            ("unet", "bidirectional"): {"images/fid": 16.7},
        }
        arms = [
            Arm(
                f"{kind}-{mode}",
                kind,
                mode,
                {"patch.kind": kind, "model.image_attention": mode},
                paper[kind, mode],
            )
            for kind in ("linear", "unet")
            for mode in ("causal", "bidirectional")
        ]
        trends = [
            Trend("linear-bidirectional", "linear-causal", m)
            for m in ("images/fid", "captions/cider", "diffusion/val_loss", "captions/nll")
        ]
        return arms, trends
    if table == 6:
        fid = {"linear": (20.3, 25.6, 43.5), "unet": (16.7, 16.0, 16.1)}
        arms = []
        for kind in ("linear", "unet"):
            for p, f in zip(scale.patch_sizes, fid[kind], strict=True):
                overrides, config = patch_arm(scale, kind, p)
                paper = {"images/fid": f}
                arms.append(Arm(f"{kind}-p{p}", kind, f"{p}x{p}", overrides, paper, config))
        small, large = scale.patch_sizes[0], scale.patch_sizes[-1]
        trends = [
            Trend(f"linear-p{small}", f"linear-p{large}", m)
            for m in ("images/fid", "diffusion/val_loss", "captions/cider", "captions/nll")
        ]
        return arms, trends
    if table == 7:
        arms = [
            Arm(f"{kind}-{size}", size, kind, {**sizes, **(unet if kind == "unet" else linear)},
                config=config)
            for size, (config, sizes) in scale.model_sizes.items()
            for kind in ("linear", "unet")
        ]  # fmt: skip
        trends = [
            Trend(f"unet-{size}", f"linear-{size}", m)
            for size in scale.model_sizes
            for m in ("images/fid", "captions/cider", "diffusion/val_loss", "captions/nll")
        ]
        return arms, trends
    if table == 8:
        off = "off (t < 1000)"
        arms = [
            Arm("noise-limit-on", "U-Net", "on (t < 500)", {"diffusion.noise_limit": 500},
                {"captions/cider": 29.4}),
            Arm("noise-limit-off", "U-Net", off, {"diffusion.noise_limit": 1000},
                {"captions/cider": 25.4}),
        ]  # fmt: skip
        trends = [
            Trend("noise-limit-on", "noise-limit-off", m)
            for m in ("captions/cider", "shapes/captioning_accuracy", "captions/nll")
        ]
        return arms, trends
    raise SystemExit(f"error: --table {table}: one of 5, 6, 7, 8")


def patch_arm(scale: Scale, kind: str, patch_size: int) -> tuple[dict, str]:
    """(overrides, config) of a patch-size arm. The U-Net keeps about the parameters of the
    scale's 2x2 U-Net at every patch size, as in the paper (`config.matched_unet_channels`);
    configs/paper.py takes the patch size in its argument and holds those widths itself."""
    from transfusion_jax.config import load_config, matched_unet_channels

    if scale.config.startswith("paper:"):
        return {}, f"{scale.config},{kind},p{patch_size}"
    overrides = {"patch.kind": kind, "image.patch_size": patch_size}
    if kind == "unet":
        cfg = load_config(scale.config)
        cfg.update_from_flattened_dict({**scale.overrides, "image.patch_size": 2})
        widths = matched_unet_channels(cfg, patch_size, multiple=8)
        overrides["patch.unet_channels"] = widths
    return overrides, ""


# -- commands ----------------------------------------------------------------------------------


def train_command(scale: Scale, table: int, arm: Arm, workdir, steps, seed, extra) -> list:
    overrides = {
        **scale.overrides,
        **scale.table_overrides.get(table, {}),
        "train.num_steps": steps,
        "train.eval_every": max(1, steps // 5),
        "train.checkpoint_every": max(1, steps // 5),
        "train.seed": seed,
        **arm.overrides,
        **extra,
    }
    return train_cli(arm.config or scale.config, workdir, overrides)


def evaluate_command(scale: Scale, workdir, suites: str, args) -> list:
    num, steps = args.num or scale.num, args.sampling_steps or scale.sampling_steps
    return evaluate_cli(workdir, suites, num, steps, scale.cfg_scale, args)


# -- results -----------------------------------------------------------------------------------


def collect(arms: list[Arm], runs: dict, steps: int) -> list[dict]:
    """One row per arm, seed and metric of the runs' final evaluations."""
    rows = []
    for arm in arms:
        for seed, workdir in runs[arm.name]:
            for metric, value in sorted((final_metrics(workdir, steps) or {}).items()):
                if metric in METRICS:
                    rows.append(
                        {"arm": arm.name, "row": arm.row, "column": arm.column, "seed": seed,
                         "step": steps, "metric": metric, "value": value}
                    )  # fmt: skip
    return rows


def summarise(rows: list[dict]) -> dict:
    """(arm, metric) -> (mean, half-range over seeds, seeds)."""
    values = {}
    for row in rows:
        values.setdefault((row["arm"], row["metric"]), []).append(float(row["value"]))
    return {
        key: (sum(v) / len(v), (max(v) - min(v)) / 2, len(v))
        for key, v in values.items()
        if all(math.isfinite(x) for x in v)
    }


def trend_verdict(trend: Trend, stats: dict) -> str | None:
    """Whether our runs show the paper's trend: reproduced, reversed, or inside the seed spread."""
    a, b = stats.get((trend.better, trend.metric)), stats.get((trend.worse, trend.metric))
    if a is None or b is None:
        return None
    higher = METRICS[trend.metric][1]
    difference = (a[0] - b[0]) if higher else (b[0] - a[0])  # > 0: the paper's direction
    spread = a[1] + b[1]
    if min(a[2], b[2]) < 2:
        verdict = ("agrees" if difference > 0 else "disagrees") + " (one seed: no spread measured)"
    elif abs(difference) <= spread:
        verdict = "inside the seed spread: no trend claimed"
    else:
        verdict = "reproduced" if difference > 0 else "reversed"
    label = METRICS[trend.metric][0]
    return (
        f"{trend.better} vs {trend.worse}, {label}: {a[0]:.4g} vs {b[0]:.4g} "
        f"(paper's direction by {difference:+.4g}, spread {spread:.2g}): {verdict}"
    )


def write_table(out: pathlib.Path, table: int, scale_name: str, arms, trends, stats, steps):
    metrics = [m for m in METRICS if any((arm.name, m) in stats for arm in arms)]
    paper = [m for m in METRICS if any(m in arm.paper for arm in arms)]
    header = ["arm", "setting"] + [METRICS[m][0] for m in metrics]
    header += [f"paper {METRICS[m][0]}" for m in paper]
    lines = [f"# {TITLES[table]} ({scale_name} scale, {steps} steps per arm)", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in arms:
        cells = [arm.row, arm.column]
        for m in metrics:
            s = stats.get((arm.name, m))
            spread = f" ± {s[1]:.2g}" if s and s[2] > 1 else ""
            cells.append("—" if s is None else f"{s[0]:.4g}{spread}")
        cells += [f"{arm.paper[m]:g}" if m in arm.paper else "—" for m in paper]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"The paper: {CLAIMS[table]}", "", "Trends, ours:"]
    verdicts = [v for v in (trend_verdict(t, stats) for t in trends) if v]
    lines += [f"- {v}" for v in verdicts] or ["- (no metrics yet)"]
    seeds = max((s[2] for s in stats.values()), default=0)
    lines += ["", f"Mean ± half-range over {seeds} seed(s); arrows of better: "]
    lines[-1] += ", ".join(f"{METRICS[m][0]} {'↑' if METRICS[m][1] else '↓'}" for m in metrics)
    (out / "table.md").write_text("\n".join(lines) + "\n")


def plot_final(out: pathlib.Path, arms, stats) -> None:
    """Grouped bars: one panel per metric, arms grouped by row and coloured by column."""
    from matplotlib import rcParams
    from matplotlib.figure import Figure

    metrics = [m for m in METRICS if any((arm.name, m) in stats for arm in arms)]
    if not metrics:
        return
    rows = list(dict.fromkeys(arm.row for arm in arms))
    columns = list(dict.fromkeys(arm.column for arm in arms))
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    width = 0.8 / len(columns)
    grid = (-(-len(metrics) // 4), min(4, len(metrics)))  # at most four panels a row
    figure = Figure(figsize=(4.2 * grid[1], 3.4 * grid[0]), layout="constrained")
    axes = figure.subplots(*grid, squeeze=False).ravel()
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    for ax, metric in zip(axes, metrics, strict=False):
        for j, column in enumerate(columns):
            xs, ys, errs = [], [], []
            for i, row in enumerate(rows):
                arm = next((a for a in arms if a.row == row and a.column == column), None)
                s = arm and stats.get((arm.name, metric))
                if s:
                    xs.append(i + (j - (len(columns) - 1) / 2) * width)
                    ys.append(s[0])
                    errs.append(s[1])
            ax.bar(xs, ys, width, yerr=errs, label=column, color=colors[j % len(colors)])
        label, higher = METRICS[metric]
        ax.set_title(f"{label} ({'higher' if higher else 'lower'} is better)")
        ax.set_xticks(range(len(rows)), rows)
    figure.axes[0].legend(fontsize="small")
    figure.savefig(out / "final.png", dpi=110)


# -- main --------------------------------------------------------------------------------------


def print_paper_scale(table: int, arms: list[Arm]) -> None:
    """The paper's settings for each arm and the TPU slice they need; nothing runs."""
    print(f"# {TITLES[table]}, at the paper's scale (nothing is run)")
    print(f"# the paper: {CLAIMS[table]}")
    print("# configs/paper.py's defaults: 250k steps of 2M-token batches (7b: 4M), seq 4096")
    for arm in arms:
        config = arm.config or PAPER.config
        size = config.partition(":")[2].split(",")[0]
        flags = " ".join(f"--config.{k}={flag_value(v)}" for k, v in arm.overrides.items())
        print(f"\n## {arm.name} ({size} at linear 2x2 fits {PAPER_SLICES[size]})")
        print(
            f"python -m transfusion_jax.train --config {config} --workdir runs/{arm.name} {flags}"
        )
        print(f"python -m transfusion_jax.evaluate --workdir runs/{arm.name} --suite "
              f"{PAPER.suites} --cfg_scale {PAPER.cfg_scale} --num 5000 --steps 250 "
              "--inception_weights PTH --clip_weights DIR")  # fmt: skip
        slice_ = PAPER_SLICES[size].split(",")[0]
        rows = 64 if size == "7b" else 16
        print(f"# this arm's memory: python -m experiments.aot_compile --config {config} "
              f"--topology {slice_} --seq 4096 --batch {rows}")  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--table", type=int, required=True, choices=(5, 6, 7, 8))
    parser.add_argument("--scale", default="cpu", choices=("cpu", "gpu", "paper"))
    parser.add_argument("--out", help="the table's folder (runs, results, plots)")
    parser.add_argument("--seeds", type=int, default=1, help="train every arm with seeds 0..N-1")
    parser.add_argument("--arms", default="", help="comma-separated subset of the arms to run")
    add_run_flags(parser)
    args = parser.parse_args(argv)
    if args.scale != "paper" and not args.out:
        parser.error("--out DIR is needed to train (only --scale paper runs without it)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    scale = {"cpu": CPU, "gpu": GPU, "paper": PAPER}[args.scale]
    arms, trends = table_arms(args.table, scale)
    if args.scale == "paper":
        print_paper_scale(args.table, arms)
        return
    all_arms = arms
    if args.arms:
        wanted = args.arms.split(",")
        unknown = sorted(set(wanted) - {arm.name for arm in arms})
        if unknown:
            names = ", ".join(arm.name for arm in arms)
            raise SystemExit(f"error: --arms {','.join(unknown)}: table {args.table} has {names}")
        arms = [arm for arm in arms if arm.name in wanted]
    extra = {"data.text_path": args.text}
    if args.scale == "gpu":
        if not args.vae and not args.dry_run:
            raise SystemExit(
                "error: --scale gpu trains in latent space: give --vae DIR (train one with "
                "python -m transfusion_jax.train_vae --config vae_tiny --workdir DIR)"
            )
        extra |= {"data.path": args.data, "image.vae_path": args.vae}
    extra |= parse_sets(args.set)
    steps = args.steps or scale.steps[args.table]
    suites = args.suites or scale.suites
    out = pathlib.Path(args.out).resolve()
    runs = {
        arm.name: [
            (seed, out / "runs" / (arm.name + (f"-s{seed}" if seed else "")))
            for seed in range(args.seeds)
        ]
        for arm in arms
    }
    jobs = [(arm, seed, workdir) for arm in arms for seed, workdir in runs[arm.name]]
    started = time.monotonic()
    for i, (arm, seed, workdir) in enumerate(jobs, 1):
        train = train_command(scale, args.table, arm, workdir, steps, seed, extra)
        score = evaluate_command(scale, workdir, suites, args)
        if args.dry_run:
            print(f"# {arm.name} seed {seed}\n{shlex.join(train)}\n{shlex.join(score)}")
            continue
        train_and_score(train, score, workdir, steps, suites, f"[{i}/{len(jobs)}] {workdir.name}")
    if args.dry_run:
        return
    # The table covers every arm and seed trained into OUT so far, not only this call's: a
    # second seed of two arms (`--arms a,b --seeds 2`) joins the table beside the others.
    on_disk = {arm.name: seed_runs(out, arm.name) for arm in all_arms}
    write_results(out, args.table, args.scale, all_arms, trends, on_disk, steps)
    print(f"{len(jobs)} runs in {(time.monotonic() - started) / 60:.1f} min; wrote {out}/table.md")


def seed_runs(out: pathlib.Path, arm: str) -> list[tuple[int, pathlib.Path]]:
    """(seed, workdir) of every run of `arm` under OUT/runs: ARM is seed 0, ARM-sN seed N."""
    pattern = re.compile(re.escape(arm) + r"(?:-s([1-9][0-9]*))?")
    found = []
    for workdir in (out / "runs").glob(f"{arm}*"):
        match = pattern.fullmatch(workdir.name)
        if match and workdir.is_dir():
            found.append((int(match.group(1) or 0), workdir))
    return sorted(found)


def write_results(out, table, scale_name, arms, trends, runs, steps) -> None:
    from transfusion_jax.plot import plot_runs

    rows = collect(arms, runs, steps)
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["arm", "row", "column", "seed", "step", "metric", "value"])
        writer.writeheader()
        writer.writerows(rows)
    stats = summarise(rows)
    write_table(out, table, scale_name, arms, trends, stats, steps)
    plot_final(out, arms, stats)
    plot_runs([workdir for arm in arms for _, workdir in runs[arm.name]], out / "curves.png")


if __name__ == "__main__":
    main()
