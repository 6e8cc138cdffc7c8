"""The training command line end to end, and a preemption (SIGTERM) that saves before exiting."""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, command_env

SMALL = [
    "--config.model.d_model=64",
    "--config.model.depth=2",
    "--config.image.latent_size=8",
    "--config.data.seq_len=64",
    "--config.data.source=synthetic",
    "--config.patch.kind=linear",
]


def run_train(workdir, *overrides):
    """The CLI as a user runs it: from the workdir's parent, with a relative --workdir."""
    config = str(ROOT / "configs" / "tiny.py")
    cmd = [sys.executable, "-m", "transfusion_jax.train", "--config", config]
    env = command_env()
    args = cmd + ["--workdir", workdir.name, *SMALL, *overrides]
    return subprocess.Popen(
        args,
        cwd=workdir.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_cli_trains_and_writes_config_and_metrics(tmp_path):
    proc = run_train(
        tmp_path,
        "--config.train.num_steps=4",
        "--config.train.log_every=2",
        "--config.train.tensorboard=True",
        "--config.train.peak_tflops=0.5",
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "step 4/4" in out and "compiled step:" in out and "model FLOPs per token" in out
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["train"]["num_steps"] == 4 and config["model"]["d_model"] == 64
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    required = {
        "step",
        "loss",
        "lm_loss",
        "diffusion_loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_s",
        "examples_seen",
    }
    assert required <= set(records[0])
    assert records[-1]["examples_seen"] == 4 * 8
    # MFU = tokens/s x model FLOPs per token / peak; the printed FLOPs per token give the check
    flops = float(out.split("model FLOPs per token ")[1].split(",")[0])
    for r in records:
        assert abs(r["mfu"] - r["tokens_per_s"] * flops / 0.5e12) < 1e-3 * r["mfu"]
    assert (tmp_path / "checkpoints" / "4").is_dir()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_sigterm_saves_a_checkpoint_before_exit(tmp_path):
    proc = run_train(tmp_path, "--config.train.num_steps=100000", "--config.train.log_every=1")
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "(SIGTERM); checkpoint saved" in out
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert (tmp_path / "checkpoints" / str(last)).is_dir()


RUN = "--workdir={run}"
MISTAKES = [
    # An override naming no key: ml_collections raises it while absl parses the flags.
    (
        [RUN, "--config.train.num_stepz=3"],
        "error: --config.train.num_stepz: the config has no key ",
    ),
    ([RUN, "--config.bogus.key=1"], "error: --config.bogus.key: the config has no key 'bogus'"),
    ([RUN, "--config.train.num_steps=abc"], "error: flag --config.train.num_steps=abc: invalid "),
    ([], "error: flag --workdir=None: Flag --workdir must have a value"),
    # An empty one (an unset shell variable) would have trained into the current directory.
    (["--workdir="], "error: flag --workdir=: an empty --workdir would write the run here"),
    # A config file that fails to load: its own message, not the traceback around it.
    ([RUN, "--config=paper:9b"], "configs/paper.py: size '9b' is not one of ("),
    # A field's check whose message ends in a quote keeps it.
    ([RUN, "--config.diffusion.objective=flwo"], "'flwo' is not 'epsilon' or 'flow'"),
]


CASES = [("train", *mistake) for mistake in MISTAKES]
# The quickstart's config flag has a default, which applies the overrides as it is defined.
CASES += [("quickstart", *MISTAKES[0]), ("quickstart", *MISTAKES[4])]


@pytest.mark.parametrize("module, args, message", CASES)
def test_command_line_mistakes_end_as_one_error_line_with_status_2(tmp_path, module, args, message):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", f"transfusion_jax.{module}"] + ["--config=tiny"] * (
        module == "train"
    )
    cmd += [a.format(run=run) for a in args]
    done = subprocess.run(
        cmd, cwd=tmp_path, env=command_env(), capture_output=True, text=True, timeout=300
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert lines[-1].startswith("error: ") and message in lines[-1], lines[-1]
    assert "Traceback" not in done.stderr and sorted(tmp_path.iterdir()) == []  # nothing written
