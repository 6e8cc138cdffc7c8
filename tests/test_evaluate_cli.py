"""The evaluate command and evaluation during training, end to end on a freshly trained run."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.helpers import ROOT, command_env, tiny_shapes_config
from transfusion_jax import evaluate as evaluate_cli
from transfusion_jax.train import train


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_shapes_run, tmp_path_factory):
    """The same run without (the shared tiny_shapes_run, copied: the tests write into it) and
    with evaluation every 2 steps, both on 2 devices."""
    plain = tmp_path_factory.mktemp("plain") / "run"
    shutil.copytree(tiny_shapes_run, plain)
    evaluated = tmp_path_factory.mktemp("evaluated")
    cfg = tiny_shapes_config(eval_every=2, eval_suites="diffusion,text,shapes")
    train(cfg, evaluated, devices=jax.devices()[:2])
    return plain, evaluated


def test_evaluation_during_training_leaves_the_losses_alone(runs):
    plain, evaluated = map(records, runs)
    assert [r["step"] for r in plain] == [r["step"] for r in evaluated] == [2, 4, 6]
    for a, b in zip(plain, evaluated, strict=True):
        for key in ("loss", "lm_loss", "diffusion_loss", "grad_norm"):
            assert a[key] == b[key], key
        assert not any(k.startswith("eval/") for k in a)
        assert 0 < b["eval/diffusion/val_loss"] < 10 and 0 < b["eval/text/bits_per_byte"] < 16
        assert b["eval/shapes/text_to_image_accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # of 4
        assert b["eval_s"] > 0
        assert b["train_flops"] == pytest.approx(a["train_flops"]) and a["train_flops"] > 0
    # an untrained model's held-out losses are the same kind of number as its training losses
    first = evaluated[0]
    assert first["eval/text/nll_per_token"] == pytest.approx(first["lm_loss"], rel=0.5)


def test_evaluate_writes_the_json_and_one_line_per_metric(runs):
    workdir = runs[0]
    env = command_env()
    cmd = [sys.executable, "-m", "transfusion_jax.evaluate", "--workdir", str(workdir)]
    cmd += ["--suite", "shapes,text,diffusion,captions", "--num", "3", "--steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    values = {name: float(value) for name, value in lines.items()}
    for name in ("shapes/text_to_image_accuracy", "shapes/captioning_accuracy"):
        assert 0 <= values[name] <= 1 and abs(values[name] * 3 - round(values[name] * 3)) < 1e-5
    assert 0 < values["diffusion/val_loss"] < 10
    assert values["text/perplexity"] >= 1.0 and 0 < values["text/bits_per_byte"] < 16
    # perplexity and bits per byte are two views of one sum: bytes tokenizer, 1 token per byte
    assert values["text/bits_per_byte"] == pytest.approx(
        np.log2(values["text/perplexity"]), rel=1e-4
    )
    assert 0 <= values["captions/cider"] <= 10 * 4  # CIDEr-D's scale
    saved = json.loads((workdir / "eval" / "6.json").read_text())
    assert saved["step"] == 6 and not saved["ema"]
    assert {k: f"{v:.6g}" for k, v in saved["metrics"].items() if k in lines} == {
        k: v for k, v in lines.items()
    }
    assert saved["settings"]["text"]["num_examples"] == 3 and set(saved["seconds"]) == {
        "shapes",
        "text",
        "diffusion",
        "captions",
    }
    assert (workdir / "eval" / "6" / "shapes_drawn.png").is_file()
    assert (workdir / "eval" / "6" / "captions.txt").is_file()


def test_evaluate_refuses_what_cannot_run(runs, capsys):
    workdir = str(runs[0])
    for args, message in [
        (["--suite", "nope"], "--suite nope: each must be one of"),
        (["--suite", "text", "--num", "0"], "--num 0: must be at least 1"),
        (["--suite", "images", "--inception_weights", "missing.pth"], "--inception_weights"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            evaluate_cli.main(["--workdir", workdir, *args])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no weights at all: the suite names both flags
        evaluate_cli.main(["--workdir", workdir, "--suite", "images"])
    err = capsys.readouterr().err
    assert "--inception_weights" in err and "--clip_weights" in err and "never" in err
