"""Orbax checkpoints of the train state and the data iterator.

Saves are asynchronous (training continues while the arrays are written) and keep the last
`train.keep_checkpoints`. A restore reads the arrays straight into the shardings of the *current*
mesh, so a run saved on one mesh shape resumes on another.

Faults: a save that fails in the background (a full disk) is reported by `check_saved` as soon
as it ends, not one save later; `restore_latest` falls back from a damaged checkpoint (a
truncated file, a missing `_METADATA`) to the newest one that restores, naming the damaged ones;
a checkpoint counts as damaged only when a second try, after a pause, fails too.
Orbax itself writes each step to a temporary directory and renames it when complete, so a crash
mid-save leaves the previous steps intact.
"""

import json
import logging
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from transfusion_jax.paths import absolute, as_path
from transfusion_jax.train_step import TrainState
from transfusion_jax.workdir import RunError, fill_legacy

log = logging.getLogger(__name__)

STREAK_FIELDS = ("nonfinite_streak", "longest_nonfinite_streak")  # added to TrainState in 0.2
RESTORE_RETRY_S = 5  # the pause before a failed restore is tried again


class _ReadOnlyNotice(logging.Filter):
    """Drops Orbax's two warnings that a read-only manager is read-only (every `sample` run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "read_only=True" not in message and "Given directory is read only" not in message


logging.getLogger("absl").addFilter(_ReadOnlyNotice())


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
        self.directory = absolute(directory)  # Orbax refuses relative paths; gs:// kept as is
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config", "info")
        )
        self._unchecked_step = None  # the save whose outcome is not known yet

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self, step: int, state: TrainState, data_state: dict, config: dict, info: dict | None = None
    ) -> None:
        """Saves the state, the data iterator's state and the config that trained them (a
        resume compares with it, and sampling builds the model from it), and `info`: facts
        measured on this step's weights (e.g. a VAE's latent statistics)."""
        self.check_saved(wait=True)  # Orbax waits for the previous save anyway
        items = dict(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
        )
        if info is not None:
            items["info"] = ocp.args.JsonSave(info)
        args = ocp.args.Composite(**items)
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
                state, data = self._restore_twice(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the one before
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

    def _restore_twice(self, step: int, abstract_state: TrainState):
        """`restore`, tried again once after a pause: a failure that passes (a storage service
        briefly unavailable, beyond its client's own retries) must not make a good checkpoint
        look damaged, since the run would then resume from an older one and set it aside."""
        try:
            return self.restore(step, abstract_state)
        except Exception as e:  # noqa: BLE001 - the second try decides
            log.warning(
                "checkpoint of step %d cannot be restored (%s); trying again in %d s",
                step,
                first_line(e),
                RESTORE_RETRY_S,
            )
        time.sleep(RESTORE_RETRY_S)
        try:
            return self.restore(step, abstract_state)
        except Exception as e:
            log.warning("checkpoint of step %d cannot be restored (%s)", step, first_line(e))
            raise

    def saved_config(self, step: int) -> dict | None:
        """The config stored with a step (None for steps saved before configs were stored, or
        if it cannot be read). Read as the plain JSON file Orbax's JSON item writes, not through
        a restore, which would be a collective across processes."""
        return self._saved_json(step, "config")

    def saved_info(self, step: int) -> dict | None:
        """The `info` saved with a step (None if it has none)."""
        return self._saved_json(step, "info")

    def _saved_json(self, step: int, item: str) -> dict | None:
        path = self.directory / str(step) / item / "metadata"
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError) as e:
            log.warning("the %s of step %d cannot be read (%s)", item, step, first_line(e))
            return None

    def config_of(self, step: int) -> dict | None:
        """The config that trained `step`: the one stored with it, else (a checkpoint from
        before configs were stored) the run's config.json beside the checkpoints; None if
        neither exists."""
        stored = self.saved_config(step)
        if stored is not None:
            return stored
        config_file = self.directory.parent / "config.json"
        return json.loads(config_file.read_text()) if config_file.is_file() else None

    def set_aside(self, step: int, where):
        """Moves a damaged step out of Orbax's directory (kept for inspection, never deleted:
        a step set aside twice gets a numbered name), so the run can save that step again."""
        where = as_path(where)
        where.mkdir(parents=True, exist_ok=True)
        target, n = where / str(step), 1
        while target.exists():
            target, n = where / f"{step}.{n}", n + 1
        (self.directory / str(step)).rename(target)
        self.manager.reload()
        return target

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict]:
        """The state at `step`, placed as `abstract_state`'s shardings say, and the data state.
        A state saved before the non-finite streak counters existed gets them as zeros."""
        if not self._is_legacy(step):
            return self._restore(step, abstract_state)
        legacy = {f: v for f, v in vars(abstract_state).items() if f not in STREAK_FIELDS}
        state, data = self._restore(step, legacy)
        zero = {f: jnp.zeros_like(getattr(abstract_state, f)) for f in STREAK_FIELDS}
        return TrainState(**state, **zero), data

    def _is_legacy(self, step: int) -> bool:
        """True for a state saved before the streak counters (its tree metadata lacks them)."""
        metadata = self.directory / str(step) / "state" / "_METADATA"
        try:
            return STREAK_FIELDS[0].encode() not in metadata.read_bytes()
        except OSError:
            return False  # unreadable: the restore reports it

    def _restore(self, step, abstract_state):
        target, legacy = self._stored_layout(step, abstract_state)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
        )
        restored = self.manager.restore(step, args=args)
        state = self._current_layout(step, restored["state"], abstract_state, legacy)
        return state, restored["data"]

    def restore_params(self, step: int, abstract_params, ema: bool = False):
        """Only the weights at `step` (the EMA weights with `ema`), placed as `abstract_params`'
        shardings say: an Orbax partial restore, which reads neither the optimizer state nor the
        other set of weights (for sampling: a quarter of an Adam + EMA state)."""
        # Without its tree metadata Orbax would read a partial target anyway: damaged, as for
        # `restore` (and training, which sets such a step aside).
        if not (self.directory / str(step) / "state" / "_METADATA").is_file():
            raise FileNotFoundError(f"step {step}: the state's _METADATA is missing")
        name = "ema_params" if ema else "params"
        wanted = {name: abstract_params}
        target, legacy = self._stored_layout(step, wanted)
        restore = ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        )
        # Straight from the step's directory: the manager's item handler for "state" is the
        # StandardCheckpointHandler of `restore`, which takes no partial target.
        checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        try:
            restored = checkpointer.restore(self.directory / str(step) / "state", args=restore)
        finally:
            checkpointer.close()
        return self._current_layout(step, restored, wanted, legacy)[name]

    @staticmethod
    def _current_layout(step, restored, abstract, legacy: bool):
        """`restored` (read as `_stored_layout` said) with every leaf in `abstract`'s shape and
        sharding."""
        if not legacy:
            return restored
        log.info("step %d: attention weights saved as flat matrices, given their heads axis", step)
        return jax.tree.map(
            lambda x, want: (
                jax.device_put(x.reshape(want.shape), want.sharding) if x.shape != want.shape else x
            ),
            restored,
            abstract,
        )

    def _stored_layout(self, step, abstract_state):
        """(restore target, whether it differs): attention kernels saved in the flat layout of
        earlier versions (`[embed, heads * head_dim]`, now `[embed, heads, head_dim]`) are read
        in their stored shape, replicated, and reshaped after (the same values, row-major)."""
        # Read by a handler of its own: the manager's `item_metadata` is None for an item no
        # handler was registered for yet (a fresh Checkpointer: every sample run, every resume).
        handler = ocp.StandardCheckpointHandler()
        try:
            metadata = handler.metadata(self.directory / str(step) / "state")
            stored = jax.tree_util.tree_flatten_with_path(metadata)
        except Exception:  # noqa: BLE001 - unreadable metadata: the restore itself reports it
            return abstract_state, False
        finally:
            handler.close()
        shapes = {_key_names(path): getattr(leaf, "shape", None) for path, leaf in stored[0]}
        changed = []

        def target(path, want):
            names, shape = _key_names(path), shapes.get(_key_names(path))
            if shape is None or tuple(shape) == want.shape or "attn" not in names:
                return want
            if math.prod(shape) != math.prod(want.shape):
                return want  # a real mismatch: the restore reports it
            changed.append(names)
            replicated = NamedSharding(want.sharding.mesh, PartitionSpec())
            return jax.ShapeDtypeStruct(tuple(shape), want.dtype, sharding=replicated)

        result = jax.tree_util.tree_map_with_path(target, abstract_state)
        return result, bool(changed)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self, quiet: bool = False) -> None:
        """Waits for the last save; a failure of it that `check_saved` did not raise yet is
        raised here, or only logged with `quiet` (while another error is being reported)."""
        try:
            self.check_saved(wait=True)
        except CheckpointSaveError as e:
            if not quiet:
                raise
            log.error("%s", e)
        finally:
            try:
                self.manager.close()
            except Exception as e:  # noqa: BLE001 - a failed save is reported by check_saved
                log.warning("closing the checkpoint manager: %s", first_line(e))


def restore_trained(workdir, make_program, step: int | None = None, defaults=None, restore=None):
    """(program, state, step) of a finished or running training directory, for inference: the
    given step, or else the newest one that restores (a damaged one is named in a warning and
    skipped), each restored by `make_program(config)` built from the config stored with it (so
    a run whose config changed on resume restores every step as it was trained). `defaults()`
    gives keys added to the project since the run was saved their default values.
    `restore(checkpoints, step, program)` reads what is wanted of a step (default: the whole
    state, `Checkpointer.restore`); it is called after `make_program`, which may refuse first."""
    workdir = as_path(workdir)
    checkpoints = Checkpointer(workdir / "checkpoints", keep=None, read_only=True)
    try:
        steps = sorted(checkpoints.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(
                f"{workdir}: no checkpoint in {workdir / 'checkpoints'} (is it a training run?)"
            )
        if step is not None and step not in steps:
            raise FileNotFoundError(f"--step {step}: {workdir / 'checkpoints'} holds steps {steps}")
        first_error = None
        for candidate in [step] if step is not None else steps:  # newest first
            stored = checkpoints.config_of(candidate)
            if stored is None:
                raise FileNotFoundError(f"{workdir}: no config.json")
            cfg = defaults() if defaults is not None else ml_collections.ConfigDict()
            cfg.update(stored)
            fill_legacy(cfg, stored)
            program = make_program(cfg)
            try:
                if restore is None:
                    state, _ = checkpoints.restore(candidate, program.abstract_state())
                else:
                    state = restore(checkpoints, candidate, program)
            except Exception as e:  # noqa: BLE001 - damaged: try the step before
                if step is not None:
                    raise
                log.warning(
                    "checkpoint of step %d cannot be restored (%s)", candidate, first_line(e)
                )
                first_error = first_error or e
                continue
            return program, state, candidate
        raise CheckpointRestoreError(
            f"{workdir}: no checkpoint can be restored ({first_line(first_error)})"
        )
    finally:
        checkpoints.close()


def _key_names(path) -> tuple[str, ...]:
    """A tree path as plain names, the same for a dict and a dataclass or named tuple."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
    return tuple(names)
