"""The ablation runner (experiments/ablations.py): the arms of each table, and a micro run that
trains, scores, tabulates and plots, then skips what it finished when run again."""

import csv
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from experiments import ablations
from tests.helpers import ROOT, command_env

EXPECTED_ARMS = {
    5: {"linear-causal", "linear-bidirectional", "unet-causal", "unet-bidirectional"},
    6: {f"{kind}-p{p}" for kind in ("linear", "unet") for p in (1, 2, 4)},
    7: {f"{kind}-{size}" for kind in ("linear", "unet") for size in ("d64x2", "d128x4", "d192x6")},
    8: {"noise-limit-on", "noise-limit-off"},
}


def dry_run(capsys, *args) -> dict:
    """arm directory -> (train argv, evaluate argv) as the dry run prints them."""
    ablations.main(["--scale", "cpu", "--out", "/nonexistent/out", "--dry_run", *args])
    lines = capsys.readouterr().out.splitlines()
    commands = {}
    for header, train, score in zip(lines[::3], lines[1::3], lines[2::3], strict=True):
        assert header.startswith("# ")
        train, score = shlex.split(train), shlex.split(score)
        commands[train[train.index("--workdir") + 1].rsplit("/", 1)[1]] = (train, score)
    return commands


def overrides(train: list) -> dict:
    return dict(a[len("--config.") :].split("=", 1) for a in train if a.startswith("--config."))


@pytest.mark.parametrize("table", [5, 6, 7, 8])
def test_dry_run_lists_each_tables_arms_with_their_settings(capsys, table):
    commands = dry_run(capsys, "--table", str(table))
    assert set(commands) == EXPECTED_ARMS[table]
    for name, (train, score) in commands.items():
        flags = overrides(train)
        assert flags["patch.kind" if table != 8 else "diffusion.noise_limit"]
        if table != 8:
            assert flags["patch.kind"] == name.split("-")[0]
        if table == 5:
            assert flags["model.image_attention"] == name.split("-")[1]
        if table == 6:
            assert flags["image.patch_size"] == name.split("-p")[1]
            assert flags["data.seq_len"] == "512"  # a 256-patch image needs the longer row
        if table == 8:
            assert flags["diffusion.noise_limit"] == ("500" if name.endswith("on") else "1000")
        assert score[score.index("--cfg_scale") + 1] == "3.0"  # the paper's ablation guidance
        assert score[score.index("--workdir") + 1] == train[train.index("--workdir") + 1]


def test_dry_run_with_seeds_and_an_arm_subset(capsys):
    commands = dry_run(capsys, "--table", "8", "--seeds", "2", "--arms", "noise-limit-on")
    assert set(commands) == {"noise-limit-on", "noise-limit-on-s1"}
    assert overrides(commands["noise-limit-on-s1"][0])["train.seed"] == "1"
    with pytest.raises(SystemExit, match="table 8 has noise-limit-on, noise-limit-off"):
        ablations.main(["--table", "8", "--out", "x", "--dry_run", "--arms", "nope"])


@pytest.mark.parametrize("script", ["ablations", "compare_chameleon"])
def test_runners_run_as_files_from_any_directory(tmp_path, script):
    """`python experiments/NAME.py` works as `python -m experiments.NAME` does, outside the
    repository too, with --out taken from where the command runs."""
    argv = ["--table", "8"] if script == "ablations" else []
    path = ROOT / "experiments" / f"{script}.py"
    run = subprocess.run(
        [sys.executable, str(path), *argv, "--scale", "cpu", "--out", "out", "--dry_run"],
        cwd=tmp_path,
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    arm = "noise-limit-off" if script == "ablations" else "chameleon-d128x4"
    assert f"--workdir {tmp_path.resolve() / 'out' / 'runs' / arm} " in run.stdout
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_paper_scale_prints_commands_and_slices(capsys):
    ablations.main(["--table", "7", "--scale", "paper"])
    out = capsys.readouterr().out
    for size in ablations.PAPER_SIZES:
        assert f"--config paper:{size} " in out
    assert "fits v5p:4x4x4" in out  # the 7b's slice


def test_a_trend_inside_the_seed_spread_is_not_claimed():
    trend = ablations.Trend("a", "b", "captions/cider")
    close = {("a", "captions/cider"): (10.0, 1.0, 2), ("b", "captions/cider"): (9.5, 0.5, 2)}
    far = {("a", "captions/cider"): (10.0, 0.1, 2), ("b", "captions/cider"): (9.0, 0.1, 2)}
    lower = {
        ("a", "diffusion/val_loss"): (0.5, 0.01, 2),
        ("b", "diffusion/val_loss"): (0.4, 0.01, 2),
    }
    assert ablations.trend_verdict(trend, close).endswith(
        "inside the seed spread: no trend claimed"
    )
    assert ablations.trend_verdict(trend, far).endswith(": reproduced")
    loss = ablations.Trend("a", "b", "diffusion/val_loss")  # lower is better: a is worse here
    assert ablations.trend_verdict(loss, lower).endswith(": reversed")


@pytest.mark.slow
def test_micro_run_writes_results_table_and_plots_then_skips_finished_arms(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"paragraph {i}: the quick brown fox. " * 4 for i in range(60)))
    out = tmp_path / "table8"
    args = ["--table", "8", "--scale", "cpu", "--out", str(out), "--steps", "2", "--num", "2"]
    args += ["--suites", "diffusion,text", "--text", str(text)]
    args += ["--set", "eval.num_examples=2", "--set", "train.eval_every=2"]
    ablations.main([*args, "--arms", "noise-limit-on"])  # trains and scores one arm
    # The other arm as a finished copy: what follows tests the runner's bookkeeping, which a
    # second two-step run would only make slower.
    shutil.copytree(out / "runs" / "noise-limit-on", out / "runs" / "noise-limit-off")
    capsys.readouterr()
    ablations.main([*args, "--arms", "noise-limit-off"])  # one arm: the table has both
    assert capsys.readouterr().out.count("finished earlier") == 1
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    got = {(row["arm"], row["metric"]) for row in rows}
    for arm in ("noise-limit-on", "noise-limit-off"):
        assert {(arm, "diffusion/val_loss"), (arm, "text/bits_per_byte")} <= got
    assert all(row["step"] == "2" for row in rows)
    table = (out / "table.md").read_text()
    assert re.search(r"\| U-Net \| on \(t < 500\) \| [0-9.]+ \|", table)
    assert "| 29.4 |" in table  # the paper's CIDEr beside ours
    assert (out / "final.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0
    assert "| U-Net | off (t < 1000) |" in table
    ablations.main(args)  # again: both arms are finished
    assert capsys.readouterr().out.count("finished earlier") == 2


def test_seed_runs_are_the_arms_folders_and_their_seed_suffixes(tmp_path):
    names = ["linear", "linear-s1", "linear-s12", "linear-s0", "linear-sx", "linear-d64", "unet-s1"]
    for name in names:
        (tmp_path / "runs" / name).mkdir(parents=True)
    (tmp_path / "runs" / "linear-s2").touch()  # a file, not a run
    got = [(seed, path.name) for seed, path in ablations.seed_runs(tmp_path, "linear")]
    assert got == [(0, "linear"), (1, "linear-s1"), (12, "linear-s12")]
    assert ablations.seed_runs(tmp_path, "unet") == [(1, tmp_path / "runs" / "unet-s1")]
