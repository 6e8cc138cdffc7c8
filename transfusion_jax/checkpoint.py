"""Orbax checkpoints of the train state and the data iterator.

Saves are asynchronous (training continues while the arrays are written) and keep the last
`train.keep_checkpoints`. A restore reads the arrays straight into the shardings of the *current*
mesh, so a run saved on one mesh shape resumes on another.
"""

import json
import pathlib

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from transfusion_jax.sharding import make_mesh
from transfusion_jax.train_step import TrainProgram, TrainState


class Checkpointer:
    def __init__(self, directory, keep: int | None, async_save: bool = True, read_only=False):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        )
        directory = pathlib.Path(directory).absolute()  # Orbax refuses relative paths
        self.manager = ocp.CheckpointManager(
            directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        )
        self.manager.save(step, args=args, force=True)

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
        self.manager.wait_until_finished()
        self.manager.close()


def load_trained(workdir, use_ema: bool = False, step: int | None = None):
    """(model, config, step) from a training run's directory, on the first local device.

    Reads DIR/config.json and the latest (or given) checkpoint; `use_ema` takes the EMA weights
    when the run kept them.
    """
    workdir = pathlib.Path(workdir)
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"--workdir {workdir}: no config.json (is it a training run?)")
    cfg = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    program = TrainProgram(cfg, make_mesh(1, 1, 1, jax.local_devices()[:1]))
    checkpoints = Checkpointer(workdir / "checkpoints", keep=None, read_only=True)
    step = checkpoints.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"--workdir {workdir}: no checkpoint in {workdir / 'checkpoints'}")
    state, _ = checkpoints.restore(step, program.abstract_state())
    checkpoints.close()
    if use_ema and not state.ema_params:
        raise ValueError(f"--workdir {workdir}: the run kept no EMA weights (train.ema_decay=0)")
    params = state.ema_params if use_ema else state.params
    return nnx.merge(program.graphdef, params), program.cfg, step
