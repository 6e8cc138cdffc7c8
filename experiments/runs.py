"""What the experiment runners share: the training command with config overrides, running a
command into a log, and training then scoring a run unless a rerun finds it finished."""

import json
import pathlib
import shlex
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def flag_value(value) -> str:
    """A config value as a --config.KEY=VALUE flag writes it (tuples without spaces)."""
    if isinstance(value, tuple):
        return str(tuple(value)).replace(" ", "")
    return str(value)


def add_run_flags(parser) -> None:
    """The flags every runner takes: what to run, how long, on what, scored how."""
    add = parser.add_argument
    add("--dry_run", "--dry-run", action="store_true", help="print the commands")
    add("--steps", type=int, default=0, help="training steps (0 = the scale's)")
    add("--suites", default="", help="final evaluation suites (the scale's)")
    add("--num", type=int, default=0, help="held-out examples per suite")
    add("--sampling_steps", type=int, default=0, help="denoising steps")
    add("--text", default=str(SHARED / "tinyshakespeare.txt"), help="text corpus")
    add("--data", default=str(SHARED / "flickr8k_1k"), help="gpu: image folder")
    add("--vae", default="", help="gpu: the KL VAE (a train_vae workdir)")
    add("--inception_weights", default="", help="for FID (gpu)")
    add("--clip_weights", default="", help="for the CLIP score (gpu)")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")


def parse_sets(items: list[str]) -> dict:
    """--set KEY=VALUE flags as overrides; a malformed one stops the runner naming it."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set {item!r}: write KEY=VALUE, e.g. train.batch_size=4")
        overrides[key] = value
    return overrides


def train_cli(config: str, workdir, overrides: dict) -> list:
    """`python -m transfusion_jax.train --config CONFIG --workdir DIR --config.KEY=VALUE ...`."""
    flags = [f"--config.{key}={flag_value(value)}" for key, value in overrides.items()]
    return [sys.executable, "-m", "transfusion_jax.train", "--config", config,
            "--workdir", str(workdir), *flags]  # fmt: skip


def evaluate_cli(workdir, suites: str, num: int, steps: int, cfg_scale: float, args) -> list:
    """`python -m transfusion_jax.evaluate` of a run's last step, with the runner's weights
    files (--inception_weights, --clip_weights) when given."""
    command = [sys.executable, "-m", "transfusion_jax.evaluate", "--workdir", str(workdir),
               "--suite", suites, "--num", str(num), "--steps", str(steps),
               "--cfg_scale", str(cfg_scale)]  # fmt: skip
    for flag in ("inception_weights", "clip_weights"):
        if getattr(args, flag):
            command += [f"--{flag}", getattr(args, flag)]
    return command


def run_logged(command: list, log: pathlib.Path, what: str) -> None:
    """Runs a command with its output appended to `log`; stops the runner on failure."""
    with log.open("a") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"error: {what} failed (exit {code}); its log: {log}\n" + "\n".join(tail))


def final_metrics(workdir, step: int) -> dict | None:
    """The metrics `evaluate` wrote for the run's last step, or None."""
    path = pathlib.Path(workdir) / "eval" / f"{step}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("metrics", {})


def train_and_score(train: list, score: list, workdir, steps: int, suites: str, label: str):
    """Trains (or resumes) a run to `steps` and scores its last step, unless an evaluation of
    that step holds every suite already (a rerun skips the run); `label` ("[i/n] name") leads
    the progress lines."""
    workdir = pathlib.Path(workdir)
    done = final_metrics(workdir, steps)
    if done and set(suites.split(",")) <= {key.split("/")[0] for key in done}:
        print(f"{label}: finished earlier", flush=True)
        return
    workdir.mkdir(parents=True, exist_ok=True)
    clock = time.monotonic()
    print(f"{label}: training {steps} steps", flush=True)
    run_logged(train, workdir / "train.log", f"training {workdir.name}")
    print(f"{label}: evaluating {suites}", flush=True)
    run_logged(score, workdir / "evaluate.log", f"evaluating {workdir.name}")
    print(f"{label}: done in {(time.monotonic() - clock) / 60:.1f} min", flush=True)
