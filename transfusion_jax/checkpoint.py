"""Orbax checkpoints of the train state and the data iterator.

Saves are asynchronous (training continues while the arrays are written) and keep the last
`train.keep_checkpoints`. A restore reads the arrays straight into the shardings of the *current*
mesh, so a run saved on one mesh shape resumes on another.
"""

import orbax.checkpoint as ocp

from transfusion_jax.train_step import TrainState


class Checkpointer:
    def __init__(self, directory, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
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
