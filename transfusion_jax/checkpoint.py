"""Orbax checkpoints of the train state and the data iterator.

Saves are asynchronous (training continues while the arrays are written) and keep the last
`train.keep_checkpoints`. A restore reads the arrays straight into the shardings of the *current*
mesh, so a run saved on one mesh shape resumes on another.

Faults: a save that fails in the background (a full disk) is reported by `check_saved` as soon
as it ends, not one save later; `restore_latest` falls back from a damaged checkpoint (a
truncated file, a missing `_METADATA`) to the newest one that restores, naming the damaged ones.
Orbax itself writes each step to a temporary directory and renames it when complete, so a crash
mid-save leaves the previous steps intact.
"""

import json
import logging
import os
import pathlib
import re
import shutil

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from transfusion_jax.sharding import make_mesh
from transfusion_jax.train_step import TrainProgram, TrainState
from transfusion_jax.workdir import RunError

log = logging.getLogger(__name__)


class CheckpointSaveError(RunError):
    pass


class CheckpointRestoreError(RunError):
    pass


def first_line(error: BaseException, limit: int = 240) -> str:
    """`Type: first line of the message`, short enough for one line of a log; an operating
    system error buried in a long message (tensorstore's) is named first."""
    code = re.search(r"os_error_code='(\d+)'|\[Errno (\d+)\]", str(error))
    if code:
        return f"{os.strerror(int(code.group(1) or code.group(2)))} ({type(error).__name__})"
    text = str(error).strip().splitlines()
    text = text[0] if text else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class Checkpointer:
    def __init__(self, directory, keep: int | None, async_save: bool = True, read_only=False):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        )
        self.directory = pathlib.Path(directory).absolute()  # Orbax refuses relative paths
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )
        self._unchecked_step = None  # the save whose outcome is not known yet

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict) -> None:
        self.check_saved(wait=True)  # Orbax waits for the previous save anyway
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        )
        try:
            self.manager.save(step, args=args, force=True)
        except Exception as e:
            raise self._save_error(step, e) from e
        self._unchecked_step = step

    def check_saved(self, wait: bool = False) -> None:
        """Raises CheckpointSaveError if the last save failed. Without `wait` it returns at once
        while that save is still being written, so the loop can call it after every step."""
        step = self._unchecked_step
        if step is None or (not wait and self.manager.is_saving_in_progress()):
            return
        self._unchecked_step = None
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:
            raise self._save_error(step, e) from e
        self.manager.reload()
        if step not in self.manager.all_steps():
            raise self._save_error(step, RuntimeError("the step is missing after the save"))

    def _save_error(self, step: int, error: BaseException) -> CheckpointSaveError:
        self.manager.reload()
        previous = [s for s in self.manager.all_steps() if s < step]
        resume = f"step {max(previous)}" if previous else "the start"
        return CheckpointSaveError(
            f"the checkpoint of step {step} was not saved in {self.directory}: "
            f"{first_line(error)}. Fix the cause (e.g. free disk space), then run the same "
            f"command again: it resumes from {resume}."
        )

    def restore_latest(self, abstract_state: TrainState):
        """(step, state, data state, damaged steps) from the newest checkpoint that restores, or
        None if there is none. Steps newer than it that failed are returned as damaged (each
        named in a warning); if none restores, CheckpointRestoreError names the first error."""
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the one before
                log.warning("checkpoint of step %d cannot be restored (%s)", step, first_line(e))
                failures.append((step, e))
                continue
            return step, state, data, [s for s, _ in failures]
        if failures:
            step, error = failures[0]
            raise CheckpointRestoreError(
                f"no checkpoint in {self.directory} can be restored (step {step}: "
                f"{first_line(error)}). If the model config changed, start a new --workdir; "
                f"otherwise the checkpoints are damaged."
            )
        return None

    def set_aside(self, step: int, where: pathlib.Path) -> pathlib.Path:
        """Moves a damaged step out of Orbax's directory (kept for inspection, not deleted), so
        the run can save that step again."""
        where.mkdir(parents=True, exist_ok=True)
        target = where / str(step)
        if target.exists():
            shutil.rmtree(target)
        (self.directory / str(step)).rename(target)
        self.manager.reload()
        return target

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict]:
        """The state at `step`, placed as `abstract_state`'s shardings say, and the data state."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        )
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the last save; a failure of it that `check_saved` did not raise yet is
        raised here (a failure already raised is not raised twice)."""
        try:
            self.check_saved(wait=True)
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - the save's failure was reported above
                pass


def load_trained(workdir, use_ema: bool = False, step: int | None = None):
    """(model, config, step) from a training run's directory, on the first local device.

    Reads DIR/config.json and the given checkpoint, or else the newest one that restores (a
    damaged latest checkpoint is named in a warning and skipped); `use_ema` takes the EMA
    weights when the run kept them.
    """
    workdir = pathlib.Path(workdir)
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"--workdir {workdir}: no config.json (is it a training run?)")
    cfg = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    program = TrainProgram(cfg, make_mesh(1, 1, 1, jax.local_devices()[:1]))
    checkpoints = Checkpointer(workdir / "checkpoints", keep=None, read_only=True)
    try:
        if step is None:
            restored = checkpoints.restore_latest(program.abstract_state())
            if restored is None:
                raise FileNotFoundError(
                    f"--workdir {workdir}: no checkpoint in {workdir / 'checkpoints'}"
                )
            step, state, _, _ = restored
        else:
            steps = checkpoints.manager.all_steps()
            if step not in steps:
                raise FileNotFoundError(
                    f"--step {step}: {workdir / 'checkpoints'} holds steps {sorted(steps)}"
                )
            state, _ = checkpoints.restore(step, program.abstract_state())
    finally:
        checkpoints.close()
    if use_ema and not state.ema_params:
        raise ValueError(f"--workdir {workdir}: the run kept no EMA weights (train.ema_decay=0)")
    params = state.ema_params if use_ema else state.params
    return nnx.merge(program.graphdef, params), program.cfg, step
