"""Training curves of one or more runs, side by side, in one image.

  python -m transfusion_jax.plot runs/a runs/b --out curves.png [--x step|flops] [--metrics k,k]

Reads each run's DIR/metrics.jsonl (one JSON object per line, as training appends them) and the
results `python -m transfusion_jax.evaluate` writes to DIR/eval/STEP.json ({"step", "metrics":
{"suite/metric": value}}; they become points `eval/suite/metric` at their step, and
`eval/ema/suite/metric` for STEP-ema.json). Draws one panel per metric: loss, lm_loss,
diffusion_loss, learning_rate and every `eval/...` key any run has (or the keys --metrics names),
one curve per run, labelled with its directory name; loss panels on a log scale. `--x flops`
plots against `train_flops`, the cumulative training FLOPs a run logs, to compare runs of
different sizes at equal compute.

A torn last line (a run killed mid-write, or still writing) and non-numeric or non-finite values
are skipped, so a live run can be plotted.
"""

import argparse
import json
import math
import sys

import numpy as np

from transfusion_jax.evaluation import COUNT_METRICS as COUNTS
from transfusion_jax.evaluation import HEADLINE_METRICS as HEADLINES
from transfusion_jax.paths import as_path, save_figure

TRAIN_KEYS = ("loss", "lm_loss", "lm_loss_after_image", "diffusion_loss", "learning_rate")
EVAL_PREFIX = "eval/"
FLOPS_KEY = "train_flops"
X_KEYS = {"step": "step", "flops": FLOPS_KEY}
X_LABELS = {"step": "step", "flops": "training FLOPs"}


class PlotError(ValueError):
    """A problem with the runs given (`main` turns it into a one-line exit message)."""


def _number(value):
    """The value as a finite float, or None: booleans, strings, NaN and inf are not plotted."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _numeric(record: dict) -> dict | None:
    """The numeric entries of one record; None without a numeric step."""
    row = {}
    for key, value in record.items():
        if (number := _number(value)) is not None:
            row[key] = number
    return row if "step" in row else None


def _read_metrics(path) -> list[dict]:
    rows = []
    lines = path.read_bytes().decode(errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i != last:  # a torn last line is expected from a live or killed run
                print(f"warning: {path}:{i + 1} is not JSON, skipped", file=sys.stderr)
            continue
        if isinstance(record, dict) and (row := _numeric(record)) is not None:
            rows.append(row)
    return rows


def _read_eval_results(run_dir) -> list[dict]:
    """DIR/eval/*.json as rows {"step": N, "eval/suite/metric": value, ...}."""
    rows = []
    for path in sorted((run_dir / "eval").glob("*.json")):
        try:
            record = json.loads(path.read_text())
            step = _number(record["step"])
            metrics = record["metrics"]
            if step is None or not isinstance(metrics, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            print(f"warning: {path} is not an evaluation result, skipped", file=sys.stderr)
            continue
        ema = record.get("ema") is True or path.stem.endswith("-ema")
        prefix = EVAL_PREFIX + ("ema/" if ema else "")
        row = {"step": step}
        for key, value in metrics.items():
            if (number := _number(value)) is not None:
                row[prefix + key] = number
        rows.append(row)
    return rows


def _run_names(dirs: list) -> list[str]:
    """Directory names, or the paths as given where two runs share a name."""
    names = [d.name or d.resolve().name for d in dirs]
    return [str(d) if names.count(name) > 1 else name for d, name in zip(dirs, names, strict=True)]


def read_runs(dirs) -> dict[str, list[dict]]:
    """{run name: rows}: each row a step's numeric values, from DIR/metrics.jsonl and
    DIR/eval/*.json, ordered by step."""
    dirs = [as_path(d) for d in dirs]  # local paths or URLs (gs://)
    if not dirs:
        raise PlotError("no run directories given")
    runs = {}
    for name, run_dir in zip(_run_names(dirs), dirs, strict=True):
        path = run_dir / "metrics.jsonl"
        if not path.is_file():
            what = "does not exist" if not run_dir.exists() else "has no metrics.jsonl"
            raise PlotError(f"{run_dir} {what}: give the directories of training runs")
        rows = _read_metrics(path) + _read_eval_results(run_dir)
        runs[name] = sorted(rows, key=lambda row: row["step"])
    return runs


def default_metrics(runs: dict[str, list[dict]], which: str = "scores") -> list[str]:
    """The training losses and learning rate any run logs, then the evaluation metrics, sorted:
    "scores" = every evaluation metric but the counts (`COUNT_METRICS`), "headline" = each
    suite's headline (`HEADLINE_METRICS`), "all" = every key (EMA results included in each)."""
    present = {key for rows in runs.values() for row in rows for key in row}
    evals = sorted(key for key in present if key.startswith(EVAL_PREFIX))

    def name(key):
        return key.removeprefix(EVAL_PREFIX).removeprefix("ema/")

    if which == "headline":
        evals = [k for k in evals if name(k) in HEADLINES]
    elif which == "scores":
        evals = [k for k in evals if name(k) not in COUNTS]
    return [key for key in TRAIN_KEYS if key in present] + evals


def _x_values(run: str, rows: list[dict], x: str) -> np.ndarray:
    """Each row's x. Rows without train_flops (e.g. evaluation results) take it interpolated
    from the rows around their step, and NaN (not drawn) outside them."""
    steps = np.array([row["step"] for row in rows])
    if x == "step":
        return steps
    known = [(row["step"], row[FLOPS_KEY]) for row in rows if FLOPS_KEY in row]
    if not known:
        raise PlotError(
            f"run {run} logs no '{FLOPS_KEY}' (cumulative training FLOPs), so it cannot be plotted "
            f"with --x flops; plot it with --x step"
        )
    known_steps, known_flops = np.array(known).T
    values = np.interp(steps, known_steps, known_flops)
    values[(steps < known_steps.min()) | (steps > known_steps.max())] = np.nan
    exact = [i for i, row in enumerate(rows) if FLOPS_KEY in row]
    values[exact] = [rows[i][FLOPS_KEY] for i in exact]
    return values


def _is_loss(key: str) -> bool:
    return key.rsplit("/", 1)[-1].endswith("loss")


def plot_runs(dirs, out, x: str = "step", metrics=None) -> list[str]:
    """Draws the runs' curves into `out` (PNG, or any format matplotlib writes by suffix);
    returns the metric keys drawn, one panel each."""
    from matplotlib import rcParams
    from matplotlib.figure import Figure  # no pyplot: no display, no global backend

    if x not in X_KEYS:
        raise PlotError(f"--x must be one of {sorted(X_KEYS)}, not {x!r}")
    runs = read_runs(dirs)
    available = {key for rows in runs.values() for row in rows for key in row}
    if metrics is None or metrics in (["all"], ["headline"]):
        keys = default_metrics(runs, "scores" if metrics is None else metrics[0])
    else:
        keys = list(dict.fromkeys(metrics))
        if not keys:
            raise PlotError("--metrics names no keys")
        missing = [key for key in keys if key not in available]
        if missing:
            raise PlotError(
                f"no run logs {', '.join(missing)}; the keys they have: "
                f"{', '.join(sorted(available - {'step'}))}"
            )
    if not keys:
        raise PlotError(
            f"nothing to plot: none of {', '.join(runs)} logs {', '.join(TRAIN_KEYS)} or eval/ keys"
        )
    xs = {run: _x_values(run, rows, x) for run, rows in runs.items()}
    palette = rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {run: palette[i % len(palette)] for i, run in enumerate(runs)}  # same in every panel

    columns = min(3, len(keys))
    rows_count = math.ceil(len(keys) / columns)
    figure = Figure(figsize=(5.0 * columns, 3.6 * rows_count), layout="constrained")
    axes = figure.subplots(rows_count, columns, squeeze=False).ravel()
    for ax, key in zip(axes, keys, strict=False):
        drawn = []
        for run, rows in runs.items():
            points = [(xv, row[key]) for xv, row in zip(xs[run], rows, strict=True) if key in row]
            points = [(xv, yv) for xv, yv in points if not np.isnan(xv)]
            if not points:
                continue
            px, py = np.array(points).T
            sparse = key.startswith(EVAL_PREFIX) or len(points) < 3
            marker = "o" if sparse else None
            ax.plot(px, py, color=colors[run], marker=marker, markersize=3, label=run)
            drawn.append(py)
        if drawn and _is_loss(key) and min(v.min() for v in drawn) > 0:
            ax.set_yscale("log")
        ax.set_title(key, fontsize="medium")
        ax.set_xlabel(X_LABELS[x])
        ax.grid(True, which="both", alpha=0.3)
        if drawn:
            ax.legend(fontsize="small")
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    save_figure(figure, out)
    return keys


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m transfusion_jax.plot", description=__doc__.splitlines()[0]
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="training run directories")
    parser.add_argument("--out", required=True, help="the image to write (e.g. curves.png)")
    parser.add_argument(
        "--x", choices=sorted(X_KEYS), default="step", help="x axis: step (default) or train_flops"
    )
    parser.add_argument(
        "--metrics",
        default=None,
        help="comma-separated keys to draw; 'headline' (each suite's main metric) or 'all' "
        "(counts too); default: the losses, the learning rate and every evaluation metric",
    )
    args = parser.parse_args(argv)
    metrics = None
    if args.metrics is not None:
        metrics = [key.strip() for key in args.metrics.split(",") if key.strip()]
    try:
        keys = plot_runs(args.dirs, args.out, x=args.x, metrics=metrics)
    except PlotError as e:  # exit status 2, as the other commands refuse what they are given
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {args.out}: {len(keys)} panels ({', '.join(keys)})")


if __name__ == "__main__":
    main()
