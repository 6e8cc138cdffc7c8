"""Fault injection on training: kill -9 at three moments of an async save, a damaged checkpoint, a
failed save (injected, and a real full filesystem), two trainers on one workdir, a changed config
on resume, replayed and torn metrics lines, and a storm of non-finite steps. Each test injects
the fault and checks the promise: the run resumes exactly (compared with an uninterrupted run),
or stops with one line that says what to do, and nothing is lost or mixed."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import struct as flax_struct
from orbax.checkpoint._src.checkpointers import async_checkpointer

from tests.helpers import ROOT, command_env
from tests.test_training import PoisonedSource, final_params, read_metrics, small_config
from transfusion_jax import checkpoint as checkpoint_module
from transfusion_jax import data as data_module
from transfusion_jax.checkpoint import Checkpointer, CheckpointSaveError
from transfusion_jax.inference import load_trained
from transfusion_jax.sharding import make_mesh
from transfusion_jax.train import NonFiniteLossError, own_data_state, train
from transfusion_jax.train_step import TrainProgram
from transfusion_jax.workdir import (
    ConfigChangedError,
    WorkdirLock,
    WorkdirLockedError,
    config_as_json,
    config_changes,
    trim_metrics,
    write_config,
)

TIMING = ("tokens_per_s", "step_s")


def untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def fault_config():
    cfg = small_config()
    cfg.train.update(num_steps=6, checkpoint_every=2, keep_checkpoints=2)
    return cfg


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of fault_config(): what every recovered run must equal."""
    workdir = tmp_path_factory.mktemp("straight")
    train(fault_config(), workdir)
    return workdir


def assert_same_run(workdir, reference, cfg):
    steps = [r["step"] for r in read_metrics(workdir)]
    assert steps == list(range(1, cfg.train.num_steps + 1)), steps  # no replayed step twice
    assert untimed(read_metrics(workdir)) == untimed(read_metrics(reference))
    jax.tree.map(
        np.testing.assert_array_equal, final_params(workdir, cfg), final_params(reference, cfg)
    )


# -- kill -9 during an async save ----------------------------------------------------------------

KILLER = """
import os, signal, sys
import orbax.checkpoint as ocp
from orbax.checkpoint._src.checkpointers import async_checkpointer
from tests.test_faults import fault_config
from transfusion_jax.train import train

owner, name, when, workdir = sys.argv[1:]
owner = {"manager": ocp.CheckpointManager, "async": async_checkpointer}[owner]
original = getattr(owner, name)
calls = []

def killed(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2 and when == "before":  # the second save: step 4
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    if len(calls) == 2 and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(owner, name, killed)
train(fault_config(), workdir)
"""


def subprocess_env():
    return command_env(devices=8, PYTHONPATH=str(ROOT))  # the in-process mesh


@pytest.mark.slow
@pytest.mark.parametrize(
    "moment",
    [
        # the arrays are being written, into the step's temporary directory
        ("async", "_background_wait_for_commit_futures", "before"),
        # written and renamed into place; the manager has not finalized the step
        ("manager", "_finalize_checkpoint", "before"),
        # finalized; the steps past keep_checkpoints are not deleted yet
        ("manager", "_finalize_checkpoint", "after"),
    ],
    ids=["writing", "committed", "finalized"],
)
def test_kill_9_during_an_async_save_resumes_exactly(tmp_path, straight, moment):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-c", KILLER, *moment, str(workdir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    # Killed while step 4 was saved in the background: training went on for up to two steps
    # (the save of step 6 waits for it), so the resume replays logged steps.
    assert read_metrics(workdir)[-1]["step"] in (4, 5, 6)
    train(fault_config(), workdir)
    assert_same_run(workdir, straight, fault_config())


# -- a damaged latest checkpoint ----------------------------------------------------------------


def damage(step_dir, how):
    if how == "truncated data files":
        # Every array file: sampling reads the weights only, which a damaged optimizer state
        # alone would leave readable.
        for data in (step_dir / "state").glob("ocdbt.process_*/d/*"):
            data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    else:
        (step_dir / "state" / "_METADATA").unlink()


@pytest.mark.parametrize("how", ["truncated data files", "missing _METADATA"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_step(
    tmp_path, straight, how, caplog, monkeypatch
):
    monkeypatch.setattr(checkpoint_module, "RESTORE_RETRY_S", 0)
    workdir = tmp_path / "run"
    cfg = fault_config()
    train(cfg, workdir, stop_at_step=4)  # checkpoints 2 and 4
    damage(workdir / "checkpoints" / "4", how)
    # Sampling chooses the newest step that restores, or the one asked for.
    model, _, step = load_trained(workdir)
    assert step == 2 and "checkpoint of step 4 cannot be restored" in caplog.text
    with pytest.raises(Exception):  # noqa: B017 - whatever Orbax raises for that damage
        load_trained(workdir, step=4)
    # Training warns, sets step 4 aside (kept, not deleted) and resumes from step 2, exactly.
    train(cfg, workdir)
    assert (workdir / "damaged_checkpoints" / "4").is_dir()
    assert_same_run(workdir, straight, cfg)


@pytest.mark.parametrize("failures", [1, 2])
def test_a_restore_that_fails_once_is_not_damage(tmp_path, monkeypatch, failures):
    """A storage service briefly unavailable fails one read of the newest checkpoint: tried
    again, it restores, and nothing is set aside. Failing twice, it counts as damaged."""
    checkpoints = Checkpointer(tmp_path / "checkpoints", keep=3)
    monkeypatch.setattr(checkpoints.manager, "all_steps", lambda: [2, 4])
    monkeypatch.setattr(checkpoint_module, "RESTORE_RETRY_S", 0)
    tries = []

    def restore(step, abstract_state):
        tries.append(step)
        if step == 4 and tries.count(4) <= failures:
            raise ValueError("UNAVAILABLE: the storage service is unavailable")
        return f"state {step}", {"data": step}

    monkeypatch.setattr(checkpoints, "restore", restore)
    restored = checkpoints.restore_latest(abstract_state=None)
    checkpoints.close()
    if failures == 1:
        assert restored == (4, "state 4", {"data": 4}, []) and tries == [4, 4]
    else:
        assert restored == (2, "state 2", {"data": 2}, [4]) and tries == [4, 4, 2]


# -- a failed save: injected, and a real full filesystem --------------------------------------


def test_a_failed_save_stops_the_run_before_the_next_save(tmp_path, monkeypatch):
    """ENOSPC injected where a real one surfaces: in Orbax's background thread that waits for
    the array writes before it commits the step (see the full-disk test for the real thing)."""
    original = async_checkpointer._background_wait_for_commit_futures
    calls = []

    def disk_full(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the save of step 40
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*args, **kwargs)

    monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", disk_full)
    cfg = small_config()
    cfg.train.update(num_steps=120, checkpoint_every=40, log_every=1)
    with pytest.raises(CheckpointSaveError) as failure:
        train(cfg, tmp_path)
    message = str(failure.value)
    assert "the checkpoint of step 40 was not saved in " in message
    assert ": No space left on device (OSError). Fix the cause" in message
    assert "run the same command again: it resumes from the start." in message
    assert "\n" not in message
    assert read_metrics(tmp_path)[-1]["step"] < 80  # not one save later
    assert not (tmp_path / "checkpoints" / "40").exists()


@pytest.fixture
def small_filesystem(tmp_path):
    """A 40 MB tmpfs (needs root and mount rights, as on the project's machines and CI)."""
    mount = tmp_path / "small_fs"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True
    )
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory, leave_bytes):
    """Fills the filesystem of `directory` until `leave_bytes` remain free."""
    filler = directory / "filler"
    free = shutil.disk_usage(directory).free - leave_bytes
    with filler.open("wb") as f:
        f.write(b"\0" * max(free, 0))
    return filler


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_and_resumes_exactly(small_filesystem, straight):
    workdir = small_filesystem / "run"
    cfg = fault_config()
    train(cfg, workdir, stop_at_step=2)
    filler = fill(small_filesystem, leave_bytes=64 * 1024)  # room for metrics, not a checkpoint
    with pytest.raises(CheckpointSaveError, match=r"step 4 was not saved .*: No space left on"):
        train(cfg, workdir)
    assert not (workdir / "checkpoints" / "4").exists()
    filler.unlink()  # the user frees space and runs the same command again
    train(cfg, workdir)
    assert_same_run(workdir, straight, cfg)


# -- metrics.jsonl after a crash ------------------------------------------------------------------


def test_replayed_and_torn_metrics_lines_are_cut_on_resume(tmp_path, straight):
    cfg = fault_config()
    train(cfg, tmp_path, stop_at_step=2)
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as f:  # what a kill -9 after step 3 and a full disk leave behind
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
        f.write('{"step": 4, "lo')
    train(cfg, tmp_path)
    assert_same_run(tmp_path, straight, cfg)


def test_trim_metrics_keeps_complete_records_up_to_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + "\nnot json\n" + '{"step": 5')
    assert trim_metrics(path, 2) == 4  # steps 3 and 4, the bad line, the torn one
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    assert trim_metrics(path, 2) == 0


# -- two trainers, one workdir ------------------------------------------------------------------


def test_a_second_trainer_is_refused_naming_the_holder(tmp_path):
    lock = WorkdirLock(tmp_path)
    try:
        with pytest.raises(WorkdirLockedError, match=f"in use by pid {os.getpid()} on "):
            train(small_config(), tmp_path)
    finally:
        lock.release()
    assert not (tmp_path / "metrics.jsonl").exists()
    WorkdirLock(tmp_path).release()  # free again once released


@pytest.mark.slow
def test_two_trainer_processes_one_runs_one_is_refused(tmp_path):
    from tests.test_cli import run_train

    first = run_train(tmp_path, "--config.train.num_steps=100000", "--config.train.log_every=1")
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert first.poll() is None and time.time() < deadline, first.communicate()[0]
        time.sleep(0.2)
    second = run_train(tmp_path, "--config.train.num_steps=100000")
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 2, out
    assert f"error: --workdir {tmp_path.name} is in use by pid {first.pid} on " in out
    assert "Traceback" not in out
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 0
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved records


# -- a changed config on resume -----------------------------------------------------------------


def test_resume_refuses_model_data_and_optimizer_changes_and_keeps_config_json(tmp_path):
    cfg = fault_config()
    train(cfg, tmp_path, stop_at_step=2)
    saved = (tmp_path / "config.json").read_text()
    metrics = (tmp_path / "metrics.jsonl").read_text()
    for section, key, value in [
        ("model", "d_model", 128),
        ("train", "batch_size", 16),
        ("optimizer", "peak_lr", 1e-2),
        ("data", "source", "shapes"),
    ]:
        changed = fault_config()
        changed[section][key] = value
        with pytest.raises(ConfigChangedError, match=rf"{section}\.{key} .* -> "):
            train(changed, tmp_path)
        assert (tmp_path / "config.json").read_text() == saved  # sample still matches it
        assert (tmp_path / "metrics.jsonl").read_text() == metrics
    model, restored_cfg, step = load_trained(tmp_path)
    assert step == 2 and restored_cfg.model.d_model == cfg.model.d_model


def test_resume_accepts_steps_checkpointing_and_mesh_changes(tmp_path, straight):
    first = fault_config()
    first.train.num_steps = 4  # steps 1-2 are warm-up: the same rates under either length
    train(first, tmp_path, stop_at_step=2)
    changed = fault_config()  # num_steps 6 as the straight run
    changed.train.update(checkpoint_every=3, keep_checkpoints=5)
    changed.mesh.update(data=2, fsdp=2, tensor=2)
    changed.data.num_threads = 2
    train(changed, tmp_path)
    resumed, reference = read_metrics(tmp_path), read_metrics(straight)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for key in ("loss", "lm_loss", "diffusion_loss", "grad_norm", "learning_rate"):
        np.testing.assert_allclose(
            [r[key] for r in resumed], [r[key] for r in reference], rtol=2e-4
        )
    assert json.loads((tmp_path / "config.json").read_text())["train"]["keep_checkpoints"] == 5
    previous = json.loads((tmp_path / "config.step_2.json").read_text())
    assert previous["train"]["num_steps"] == 4  # the config that trained steps 1-2


def test_a_resume_on_another_number_of_processes_starts_the_data_afresh(tmp_path, capsys):
    # Each process reads its own slice of the records, so one process's iterator state is no
    # place in another split. A checkpoint whose data states two processes saved, resumed by
    # one: the stream restarts (as after a data change), instead of resuming process 0's slice.
    cfg = fault_config()
    train(cfg, tmp_path, stop_at_step=2)
    item = tmp_path / "checkpoints" / "2" / "data" / "metadata"
    states = json.loads(item.read_text())
    item.write_text(json.dumps({"0": states["0"], "1": states["0"]}))
    capsys.readouterr()
    train(cfg, tmp_path)
    out = capsys.readouterr().out
    assert "read by 2 processes and this run has 1, so the data stream starts afresh" in out
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 7))
    assert own_data_state(states, 0, 1) == states["0"]
    assert own_data_state({"0": {}, "1": {}}, 1, 2) == {} and own_data_state(states, 1, 2) is None


def test_the_resume_is_checked_against_the_checkpoints_own_config(tmp_path):
    cfg = fault_config()
    train(cfg, tmp_path, stop_at_step=2)
    (tmp_path / "config.json").unlink()  # lost, or rewritten by a run that never saved
    changed = fault_config()
    changed.model.d_model = 128
    with pytest.raises(ConfigChangedError, match=r"model\.d_model 64 -> 128"):
        train(changed, tmp_path)
    _, restored_cfg, step = load_trained(tmp_path)  # sampling reads the stored config too
    assert step == 2 and restored_cfg.model.d_model == 64
    train(cfg, tmp_path)
    assert read_metrics(tmp_path)[-1]["step"] == 6


def test_write_config_never_replaces_the_config_that_trained_a_step(tmp_path):
    first, second, third = fault_config(), fault_config(), fault_config()
    second.train.keep_checkpoints, third.train.keep_checkpoints = 7, 9
    write_config(tmp_path, first, None)
    write_config(tmp_path, second, 4)
    write_config(tmp_path, third, 4)  # a second resume from step 4 (the first saved nothing)
    kept = json.loads((tmp_path / "config.step_4.json").read_text())
    assert kept["train"]["keep_checkpoints"] == first.train.keep_checkpoints
    assert json.loads((tmp_path / "config.json").read_text())["train"]["keep_checkpoints"] == 9


def test_config_changes_know_new_keys_a_pinned_schedule_and_moved_data():
    saved = config_as_json(fault_config())
    del saved["data"]["max_image_pixels"]  # a run saved before the key existed
    new = fault_config()
    new.optimizer.decay_steps = saved["train"]["num_steps"]  # the schedule it already had
    new.data.path = "/mnt/elsewhere"
    changes = config_changes(saved, config_as_json(new))
    assert changes.refused == {}
    assert set(changes.allowed) == {"optimizer.decay_steps", "data.path"}
    new.data.max_image_pixels = 10
    new.optimizer.decay_steps = 1000
    assert set(config_changes(saved, config_as_json(new)).refused) == {
        "data.max_image_pixels",
        "optimizer.decay_steps",
    }


@flax_struct.dataclass
class LegacyTrainState:
    """TrainState as checkpoints before 0.2 hold it: no non-finite streak counters."""

    step: jax.Array
    params: dict
    opt_state: object
    ema_params: dict
    rng: jax.Array
    nonfinite_steps: jax.Array
    first_nonfinite_step: jax.Array


def test_a_checkpoint_without_the_streak_counters_restores(tmp_path):
    cfg = small_config()
    program = TrainProgram(cfg, make_mesh(1, 1, 1, jax.devices()[:1]))
    state = program.init_state(0)
    legacy = LegacyTrainState(**{f: getattr(state, f) for f in LegacyTrainState.__annotations__})
    checkpoints = Checkpointer(tmp_path, keep=3, async_save=False)
    args = ocp.args.Composite(state=ocp.args.StandardSave(legacy), data=ocp.args.JsonSave({}))
    checkpoints.manager.save(5, args=args)
    restored, _ = checkpoints.restore(5, program.abstract_state())
    checkpoints.close()
    assert int(restored.nonfinite_streak) == 0 and int(restored.longest_nonfinite_streak) == 0
    jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)


def test_allow_config_change_resumes_with_a_fresh_data_stream(tmp_path, monkeypatch):
    cfg = fault_config()
    train(cfg, tmp_path, stop_at_step=2)
    states = []
    original = data_module.SyntheticSource.set_state
    monkeypatch.setattr(
        data_module.SyntheticSource, "set_state", lambda s, x: (states.append(x), original(s, x))
    )
    changed = fault_config()
    changed.data.caption_len = 8  # another data stream: its iterator state does not apply
    train(changed, tmp_path, allow_config_change=True)
    assert states == []
    assert read_metrics(tmp_path)[-1]["step"] == 6
    assert json.loads((tmp_path / "config.json").read_text())["data"]["caption_len"] == 8


# -- a storm of non-finite steps ------------------------------------------------------------------


class StormSource(PoisonedSource):
    """Synthetic rows whose latents are NaN from batch 2 (0-based) on."""

    def __next__(self):
        batch = super(PoisonedSource, self).__next__()
        if self.batches_done - 1 >= 2:
            batch = batch.replace(latents=np.full_like(batch.latents, np.nan))
        return batch


def test_skip_policy_gives_up_after_a_streak_of_nonfinite_steps(tmp_path, monkeypatch):
    monkeypatch.setitem(data_module.SOURCES, "storm", StormSource)
    cfg = small_config()
    cfg.data.source = "storm"
    # 6 steps, as small_config's other runs (the same compiled step): it gives up at step 5
    cfg.train.update(nan_policy="skip", max_nonfinite_streak=3, num_steps=6)
    cfg.train.update(checkpoint_every=1, keep_checkpoints=3)
    with pytest.raises(NonFiniteLossError, match="3 steps in a row had a non-finite loss"):
        train(cfg, tmp_path)
    assert read_metrics(tmp_path)[-1]["step"] == 5  # steps 3, 4, 5 were non-finite
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert steps == [2, 3, 4]  # no checkpoint of step 5; each saved one holds step-2 weights


def test_skip_policy_rides_out_a_shorter_streak(tmp_path, monkeypatch):
    monkeypatch.setitem(data_module.SOURCES, "poisoned", PoisonedSource)  # batches 2 and 3
    cfg = small_config()
    cfg.data.source = "poisoned"
    cfg.train.update(nan_policy="skip", max_nonfinite_streak=3)
    last = train(cfg, tmp_path)
    assert last["step"] == 6 and last["nonfinite_steps"] == 2
