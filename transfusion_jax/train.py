"""Train a Transfusion model: the same code on 1 CPU, 8 GPUs or a TPU pod.

  python -m transfusion_jax.train --config configs/tiny.py --workdir workdirs/tiny \
      --config.train.num_steps=200

`python -m transfusion_jax.configs tiny` lists every config key with its value and meaning.
The run writes DIR/config.json (the resolved config), appends one JSON line per logging step to
DIR/metrics.jsonl and keeps checkpoints in DIR/checkpoints. Starting again in the same DIR resumes
from the latest checkpoint, on whatever mesh the config now asks for. SIGTERM or SIGINT (a
preemption) saves a checkpoint before exiting.
"""

import json
import os
import signal
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from transfusion_jax import cli
from transfusion_jax import sharding as shd
from transfusion_jax.checkpoint import Checkpointer
from transfusion_jax.config import base_config, data_recipe_warnings, resolve_model
from transfusion_jax.data import make_source
from transfusion_jax.evaluation import HEADLINE_METRICS
from transfusion_jax.evaluation.evaluator import Evaluator
from transfusion_jax.evaluation.heldout import why_not
from transfusion_jax.evaluation.suites import SUITES
from transfusion_jax.flops import device_peak_tflops, model_flops_per_token
from transfusion_jax.model import parameter_counts
from transfusion_jax.paths import absolute, as_path, is_local
from transfusion_jax.train_step import TrainProgram
from transfusion_jax.workdir import (
    ConfigChangedError,
    ConfigChanges,
    RunError,
    WorkdirLock,
    config_as_json,
    config_changes,
    trim_metrics,
    write_config,
)


class NonFiniteLossError(RunError):
    pass


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def launched_as_several_processes() -> bool:
    """True under a multi-process launcher (TPU pod slice, SLURM, MPI, or explicit coordinator)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        return True
    return int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


class MetricsWriter:
    """metrics.jsonl (always), TensorBoard event files (train.tensorboard, via tensorboardX) and
    Weights & Biases (train.wandb_project; one W&B run per workdir, continued on resume).

    A local metrics.jsonl is appended to, one line per record. An object (gs://) cannot be
    appended to: the writer keeps the file's bytes and writes the whole object again at each
    record (as TensorFlow's gfile does for an append there), each write complete or absent."""

    def __init__(self, workdir, tensorboard: bool, wandb_project: str = "", cfg=None):
        workdir = as_path(workdir)
        self.path = workdir / "metrics.jsonl"
        self._written = None  # an object's content so far (None: a local file, appended to)
        if not is_local(self.path):
            self._written = self.path.read_bytes() if self.path.is_file() else b""
        self.tb = self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError(
                    "config field train.wandb_project needs wandb: "
                    "pip install 'transfusion_jax[wandb]'"
                ) from e
            id_file = workdir / "wandb_id"
            if not id_file.is_file():
                id_file.write_text(wandb.util.generate_id() + "\n")
            self.wandb = wandb.init(
                project=wandb_project,
                id=id_file.read_text().strip(),
                resume="allow",
                # W&B stages its files in a local directory (a temporary one for a gs:// run)
                dir=str(workdir) if is_local(workdir) else tempfile.mkdtemp(prefix="wandb"),
                config=None if cfg is None else cfg.to_dict(),
            )
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    "config field train.tensorboard needs tensorboardX: "
                    "pip install 'transfusion_jax[tensorboard]'"
                ) from e
            self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        try:
            if self._written is None:
                with self.path.open("a") as f:
                    f.write(line)
            else:
                self.path.write_bytes(self._written + line.encode())
                self._written += line.encode()
        except OSError as e:
            raise RunError(
                f"cannot append step {record['step']} to {self.path} ({e.strerror or e}). Fix the "
                f"cause (e.g. free disk space), then run the same command again: it resumes from "
                f"the last checkpoint and cuts the file back to it."
            ) from e
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, record["step"])
            self.tb.flush()
        if self.wandb is not None:
            numbers = {k: v for k, v in record.items() if isinstance(v, int | float)}
            self.wandb.log(numbers, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


class PreemptionFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.raised = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.raised = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _print_compiled(compiled, task):
    memory = compiled.memory_analysis()
    if memory is not None:
        gib = 2.0**-30
        log(
            f"compiled step: arguments {memory.argument_size_in_bytes * gib:.2f} GiB, "
            f"outputs {memory.output_size_in_bytes * gib:.2f} GiB, "
            f"temporaries {memory.temp_size_in_bytes * gib:.2f} GiB per device"
        )
    if task.flops_per_unit:
        per_step = task.flops_per_unit * task.units_per_step
        log(f"model FLOPs per {task.unit[:-1]} {task.flops_per_unit:.4g}, per step {per_step:.4g}")


def eval_suites(cfg) -> list[str]:
    """The suites run during training: none unless train.eval_every is set."""
    training = cfg.train
    if not training.get("eval_every", 0):
        return []
    suites = [s.strip() for s in training.get("eval_suites", "").split(",") if s.strip()]
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(
            f"config field train.eval_suites: {', '.join(unknown)} is not one of "
            f"{', '.join(SUITES)}"
        )
    return suites


class TransfusionTask:
    """What the loop needs to know about one kind of model: here, Transfusion. Another kind (the
    VAE, `transfusion_jax.train_vae`) gives the same members and reuses the whole loop: mesh,
    resume, checkpoints, preemption, metrics and the non-finite guard."""

    unit = "tokens"  # throughput is reported per this unit
    logged = (
        "loss",
        "lm_loss",
        "diffusion_loss",
        "lm_loss_after_image",
        "learning_rate",
        "grad_norm",
    )
    default_config = staticmethod(base_config)

    @staticmethod
    def resolve(cfg):
        """The checked config; a latent-space run's VAE must be there before anything starts,
        and the evaluation suites must be ones that can score this run."""
        cfg = resolve_model(cfg)
        suites = eval_suites(cfg)
        if suites and "shapes" in suites and cfg.data.source != "shapes":
            raise ValueError(
                f"config field train.eval_suites: 'shapes' scores runs on the built-in shapes "
                f"data, this one trains on data.source={cfg.data.source!r}"
            )
        if suites and "images" in suites:
            raise ValueError(
                "config field train.eval_suites: 'images' (FID, CLIP score) needs hundreds of "
                "drawn images; run it with python -m transfusion_jax.evaluate"
            )
        if cfg.model.image_repr == "discrete":
            from transfusion_jax.vae.latent_space import newest_step

            if not cfg.image.vae_path:  # a codebook size alone serves shape-only uses
                raise ValueError(
                    "config field image.vae_path: a discrete run trains on its VQ tokenizer's "
                    "codes; give the tokenizer's workdir (python -m transfusion_jax.train_vae "
                    "--config vq_tiny --workdir DIR)"
                )
            # absolute, so sampling elsewhere finds the same tokenizer, and pinned to a step
            cfg.image.vae_path = str(absolute(cfg.image.vae_path))
            cfg.image.vae_step = cfg.image.vae_step or newest_step(cfg.image.vae_path)
        if cfg.data.latents == "vae" and cfg.data.source != "synthetic":
            from transfusion_jax.vae.latent_space import latent_space

            latent_space(cfg.image.vae_path, check_files=True)  # raises naming image.vae_path
            # Absolute, so sampling from another directory finds the same VAE.
            cfg.image.vae_path = str(absolute(cfg.image.vae_path))
        return cfg

    def __init__(self, cfg, mesh):
        self.cfg = cfg
        self.program = TrainProgram(cfg, mesh)
        if self.program.discrete:  # one LM loss, split by what its targets are
            self.logged = ("loss", "image_token_loss", "text_token_loss", "lm_loss_after_image")
            self.logged += ("learning_rate", "grad_norm")
        self.counts = parameter_counts(cfg)
        self.units_per_step = cfg.train.batch_size * cfg.data.seq_len
        self.flops_per_unit = model_flops_per_token(cfg, cfg.data.seq_len, self.counts)
        self.evaluator = None
        for warning in data_recipe_warnings(cfg):  # a paper config without the paper's data
            log(f"warning: {warning}")
        self.suites = []  # the eval suites that have held-out data to read
        for suite in eval_suites(cfg):
            why = why_not(cfg, suite)
            if why:
                log(f"warning: train.eval_suites: {suite} skipped ({why})")
            else:
                self.suites.append(suite)
        generating = {"shapes", "captions"} & set(self.suites)
        if generating and jax.process_count() > 1:
            raise ValueError(
                f"config field train.eval_suites: {', '.join(sorted(generating))} generate on one "
                f"process; with {jax.process_count()} processes evaluate during training with "
                f"'text' and 'diffusion', and the rest with python -m transfusion_jax.evaluate"
            )

    def describe(self) -> str:
        return "parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in self.counts.items())

    def make_source(self, local_batch: int, process_index: int, process_count: int):
        return make_source(self.cfg, local_batch, process_index, process_count)

    def evaluate(self, state, step: int) -> dict:
        """The `train.eval_suites` on the training devices, as `eval/suite/metric` keys. The
        evaluator draws with its own fixed seed, so the training state and losses are the same
        with or without it."""
        if not self.suites:
            return {}
        model = self.program.model(state.params)
        if self.evaluator is None:  # built once: its compiled passes serve every evaluation
            # (a latent-space run's VAE is loaded in float32, as the evaluate command does)
            self.evaluator = Evaluator(self.cfg, model, mesh=self.program.mesh, step=step)
        else:
            self.evaluator.set_model(model, step)
        results, start = {}, time.perf_counter()
        for suite in list(self.suites):
            try:
                results |= self.evaluator.run([suite])
            except (ValueError, OSError) as e:  # the held-out data, not the run, is at fault
                log(
                    f"warning: train.eval_suites: {suite} failed at step {step} and is dropped: {e}"
                )
                self.suites.remove(suite)
        record = {f"eval/{key}": value for key, value in results.items()}
        return record | {"eval_s": time.perf_counter() - start}

    def checkpoint_info(self, state) -> dict | None:
        del state
        return None

    def progress_line(self, r: dict) -> str:
        if self.program.discrete:
            return (
                f"loss {r['loss']:.4f} (image tokens {r['image_token_loss']:.4f}, text "
                f"{r['text_token_loss']:.4f}, after images {r['lm_loss_after_image']:.4f})"
            )
        return (
            f"loss {r['loss']:.4f} (lm {r['lm_loss']:.4f}, after images "
            f"{r['lm_loss_after_image']:.4f}, diffusion {r['diffusion_loss']:.4f})"
        )


def train(
    cfg,
    workdir,
    devices=None,
    stop_at_step: int | None = None,
    allow_config_change=False,
    task=TransfusionTask,
) -> dict:
    """Runs (or resumes) training; returns the last logged metrics.

    stop_at_step ends the run early after that step with a checkpoint, as a preemption would.
    A resume with a config that changes what is trained (model, data, optimizer, batch) is
    refused unless `allow_config_change`. `task` says what is trained (TransfusionTask).
    """
    cfg = task.resolve(cfg)
    training = cfg.train
    workdir = as_path(workdir)  # a local path or a URL (gs://): see transfusion_jax.paths
    workdir.mkdir(parents=True, exist_ok=True)
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    try:
        checkpoints = Checkpointer(workdir / "checkpoints", training.keep_checkpoints)
        try:
            changes = _check_resume_config(
                cfg, workdir, checkpoints, allow_config_change, task.default_config()
            )
            result = _train(cfg, workdir, checkpoints, changes, devices, stop_at_step, task)
        except BaseException:
            checkpoints.close(quiet=True)  # the error in flight is the one to report
            raise
        checkpoints.close()
        return result
    finally:
        if lock is not None:
            lock.release()


def _check_resume_config(
    cfg, workdir, checkpoints, allow_change: bool, defaults
) -> ConfigChanges | None:
    """The changes from the config the latest checkpoint was trained with (None for a new run);
    raises ConfigChangedError for changes that would mix two runs, unless allowed."""
    latest = checkpoints.latest_step()
    if latest is None:
        return None
    saved = checkpoints.config_of(latest)
    if saved is None:
        raise ConfigChangedError(
            f"--workdir {workdir}: the checkpoint of step {latest} stores no config and "
            f"config.json is missing, so the resume cannot be checked; restore config.json "
            f"or give a new --workdir"
        )
    changes = config_changes(saved, config_as_json(cfg), defaults)
    if changes.refused and not allow_change:
        hint = ""
        if "data.held_out_percent" in changes.refused:
            before = changes.refused["data.held_out_percent"][0]
            hint = (
                f" (data.held_out_percent: the run trained before held-out splits, on every "
                f"record; --config.data.held_out_percent={before} resumes it as it was)"
            )
        raise ConfigChangedError(
            f"--workdir {workdir} holds a run trained with another config: "
            f"{changes.describe('refused')}{hint}. Drop those overrides to resume it, give a new "
            f"--workdir for a new run, or pass --allow_config_change to resume with them."
        )
    if changes.refused:
        log(f"warning: resuming with a changed config: {changes.describe('refused')}")
    if changes.allowed:
        log(f"resuming with {changes.describe('allowed')}")
    moved = [
        k for k in changes.allowed if k in ("data.path", "data.text_path", "data.tfds_data_dir")
    ]
    if moved:
        log(f"warning: {', '.join(moved)} moved; an exact resume needs the same data there")
    if "train.num_steps" in changes.allowed and cfg.optimizer.decay_steps == 0:
        before = changes.allowed["train.num_steps"][0]
        log(
            f"warning: the cosine schedule decays over train.num_steps, so changing it reshapes "
            f"the learning rate from here on (--config.optimizer.decay_steps={before} keeps it)"
        )
    return changes


def _train(cfg, workdir, checkpoints, changes, devices, stop_at_step, task_class) -> dict:
    training = cfg.train
    # -- mesh and shapes ---------------------------------------------------------------------
    mesh = shd.mesh_from_config(cfg, devices)
    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if (
        training.batch_size % (data_ways * training.grad_accum_steps)
        or training.batch_size % jax.process_count()
    ):
        raise ValueError(
            f"config field train.batch_size: {training.batch_size} rows must be divisible by "
            f"mesh data x fsdp = {data_ways} times grad_accum_steps = {training.grad_accum_steps}, "
            f"and by the {jax.process_count()} processes"
        )
    log(f"mesh {dict(mesh.shape)} over {mesh.devices.size} {jax.devices()[0].platform} devices")
    task = task_class(cfg, mesh)
    program = task.program
    log(task.describe())

    # -- input --------------------------------------------------------------------------------
    local_batch = training.batch_size // jax.process_count()
    source = task.make_source(local_batch, jax.process_index(), jax.process_count())

    # -- state: fresh or restored --------------------------------------------------------------
    restored = checkpoints.restore_latest(program.abstract_state())
    if restored is None:
        state, resumed_step = program.init_state(training.seed), None
        log("initialised a new model")
    else:
        resumed_step, state, data_state, damaged = restored
        for step in damaged:
            if jax.process_index() == 0:
                where = checkpoints.set_aside(step, workdir / "damaged_checkpoints")
                log(f"warning: the checkpoint of step {step} is damaged; moved to {where}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("damaged checkpoints set aside")
            checkpoints.manager.reload()
        own_state = own_data_state(data_state, jax.process_index(), jax.process_count())
        if changes is not None and changes.data_changed:
            log("warning: the data config changed, so the data stream starts afresh")
        elif own_state is None:
            log(
                f"warning: the checkpoint's data stream was read by {len(data_state)} processes "
                f"and this run has {jax.process_count()}, so the data stream starts afresh"
            )
        else:
            source.set_state(own_state)
        log(f"resumed from the checkpoint of step {resumed_step}")
    if jax.process_count() > 1:  # every process has read the old files before they change
        multihost_utils.sync_global_devices("resume checked")
    if jax.process_index() == 0:  # only now: a refused or failed resume leaves them untouched
        dropped = trim_metrics(workdir / "metrics.jsonl", resumed_step or 0)
        if dropped:
            log(f"metrics.jsonl: dropped {dropped} lines past step {resumed_step or 0}")
        write_config(workdir, cfg, resumed_step)

    if int(state.step) >= training.num_steps:  # before the compile, which takes a while
        log(
            f"the run is already at step {int(state.step)} of train.num_steps "
            f"{training.num_steps}: nothing to train (raise train.num_steps to go on)"
        )
        return {}

    # -- compile ahead of time ------------------------------------------------------------------
    first_batch = shd.global_batch(next(source), mesh)  # global shapes, also with N processes
    compiled = program.compile(first_batch)
    _print_compiled(compiled, task)
    peak = training.peak_tflops or device_peak_tflops(jax.devices()[0])
    mfu_scale = task.flops_per_unit / (peak * 1e12 * mesh.devices.size) if peak else 0.0

    # -- loop ---------------------------------------------------------------------------------
    writer = None
    if jax.process_index() == 0:
        writer = MetricsWriter(workdir, training.tensorboard, training.wandb_project, cfg)
    saved_config = config_as_json(cfg)
    preemption = PreemptionFlag()
    eval_every = training.get("eval_every", 0)  # a task with held-out metrics (the VAE) has one
    step = int(state.step)
    start = (step, int(state.nonfinite_steps))  # nan_policy=stop watches the steps from here
    last_logged, window, window_start, window_steps = {}, None, time.perf_counter(), 0
    pending = first_batch
    try:
        while step < training.num_steps:
            batch = pending if pending is not None else shd.global_batch(next(source), mesh)
            pending = None
            state, metrics = compiled(state, batch)
            step += 1
            window = metrics if window is None else jax.tree.map(jnp.add, window, metrics)
            window_steps += 1
            checkpoints.check_saved()  # a failed save stops the run as soon as it has ended

            stopping = bool(preemption.raised) or step == stop_at_step
            if jax.process_count() > 1:  # all processes must stop at the same step: decide
                stopping = step % training.log_every == 0 and _any_process(stopping)  # at log steps
            evaluating = bool(eval_every) and step % eval_every == 0
            if (
                step % training.log_every == 0
                or step == training.num_steps
                or stopping
                or evaluating
            ):
                record = _log_record(window, window_steps, window_start, step, task, mfu_scale)
                if evaluating or step == training.num_steps:
                    if stopping and step != stop_at_step:  # a signal: all processes agree
                        log(f"evaluation at step {step} skipped: a stop signal wants a checkpoint")
                    else:
                        record.update(task.evaluate(state, step))
                record["nonfinite_steps"] = int(state.nonfinite_steps)
                record["skipped_examples"] = source.skipped_examples  # distinct records
                record["skipped_draws"] = getattr(source, "skipped_draws", 0)
                if writer is not None:
                    writer.write(record)
                log(_progress_line(record, training.num_steps, task))
                evaluated = {k: v for k, v in record.items() if k.startswith("eval/")}
                if evaluated:
                    log(f"evaluation at step {step}: " + _eval_line(record))
                _check_finite(state, training, start)
                last_logged, window, window_steps = record, None, 0
                window_start = time.perf_counter()
            if step % training.checkpoint_every == 0 or step == training.num_steps or stopping:
                _check_finite(state, training, start)
                info = task.checkpoint_info(state)
                checkpoints.save(step, state, _data_states(source), saved_config, info)
            if stopping:
                checkpoints.check_saved(wait=True)
                why = preemption.raised or (
                    f"stop_at_step={stop_at_step}" if step == stop_at_step else "another process"
                )
                log(f"stopping at step {step} ({why}); checkpoint saved")
                break
        checkpoints.check_saved(wait=True)
    finally:
        preemption.restore()
        if writer is not None:
            writer.close()
    return last_logged


def _any_process(flag: bool) -> bool:
    return bool(multihost_utils.process_allgather(np.asarray([flag])).any())


def own_data_state(data_states: dict, index: int, count: int) -> dict | None:
    """This process's part of a checkpoint's data states (`_data_states`), or None when another
    number of processes saved them: each read its own slice of the records (`[index::count]`),
    so no part resumes another split. Every process decides alike, before any collective."""
    return data_states[str(index)] if len(data_states) == count else None


def _data_states(source) -> dict:
    """Every process's data-iterator state, keyed by process index: each process reads its own
    rows, and Orbax writes the JSON item from process 0 alone."""
    if jax.process_count() == 1:
        return {"0": source.get_state()}
    mine = np.frombuffer(json.dumps(source.get_state()).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([mine.size])).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: mine.size] = mine
    everyone = multihost_utils.process_allgather(padded)
    return {str(i): json.loads(bytes(everyone[i, : int(n)])) for i, n in enumerate(sizes)}


def _log_record(window, steps, start, step, task, mfu_per_unit_per_s) -> dict:
    """The window's mean metrics and throughput; MFU when the mesh's peak FLOP/s is known
    (`mfu_per_unit_per_s` = model FLOPs per unit / peak FLOP/s of the mesh, else 0)."""
    # The clock is read after the fetch, which waits for the device to finish the window's steps:
    # read before, it would time only the asynchronous dispatch.
    totals = jax.device_get(window)
    applied = float(totals.pop("finite_steps", steps))  # the steps not skipped as non-finite

    def mean(key, total):  # a skipped step's metrics are zeros, apart from its learning rate
        count = steps if key == "learning_rate" else applied
        return float(total) / count if count else float("nan")

    means = {k: mean(k, v) for k, v in totals.items()}
    elapsed = time.perf_counter() - start
    per_s = steps * task.units_per_step / elapsed
    record = {"step": step, **{k: means[k] for k in task.logged}}
    record[f"{task.unit}_per_s"] = per_s
    record["examples_seen"] = step * task.cfg.train.batch_size
    if task.flops_per_unit:  # model FLOPs of the training so far, for curves against compute
        record["train_flops"] = step * task.units_per_step * task.flops_per_unit
    record["step_s"] = elapsed / steps
    if mfu_per_unit_per_s:
        record["mfu"] = per_s * mfu_per_unit_per_s
    return record


def _progress_line(r: dict, num_steps: int, task) -> str:
    line = (
        f"step {r['step']}/{num_steps}  {task.progress_line(r)}  lr {r['learning_rate']:.2e}  "
        f"grad_norm {r['grad_norm']:.3f}  {r[f'{task.unit}_per_s']:.0f} {task.unit}/s"
    )
    if "mfu" in r:
        line += f"  MFU {100 * r['mfu']:.1f}%"
    return line


def _eval_line(record: dict) -> str:
    """The headline metrics (metrics.jsonl has them all)."""
    shown = {k: record[f"eval/{k}"] for k in HEADLINE_METRICS if f"eval/{k}" in record}
    line = "  ".join(f"{k} {v:.4g}" for k, v in shown.items())
    return line + f"  ({record.get('eval_s', 0):.0f} s)"


def _check_finite(state, training, start: tuple[int, int]) -> None:
    """Stops the run as train.nan_policy and max_nonfinite_streak say. `start` = (step, skipped
    steps) where this run began: steps a resumed run skipped under `skip` are not counted."""
    start_step, skipped_before = start
    if training.nan_policy == "stop" and int(state.nonfinite_steps) > skipped_before:
        first = int(state.first_nonfinite_step)
        where = f"step {first + 1}" if not skipped_before else f"a step after step {start_step}"
        raise NonFiniteLossError(
            f"{where}: the loss or gradient is not finite. That update was not applied, "
            f"so the weights (and any checkpoint) are still clean. Lower optimizer.peak_lr (resume "
            f"with --allow_config_change), check the data, or set "
            f"--config.train.nan_policy=skip to skip such steps."
        )
    longest = int(state.longest_nonfinite_streak)
    if longest >= training.max_nonfinite_streak:
        raise NonFiniteLossError(
            f"{longest} steps in a row had a non-finite loss or gradient "
            f"({int(state.nonfinite_steps)} of {int(state.step)} in all; none was applied, so the "
            f"checkpoints are clean). The run is not training: lower optimizer.peak_lr (resume "
            f"with --allow_config_change) or check the data (train.max_nonfinite_streak sets "
            f"this limit)."
        )


# -- command line --------------------------------------------------------------------------------


def define_flags() -> None:
    """The command's flags, defined only when it runs (importing the module defines none)."""
    config_flags.DEFINE_config_file("config", None, "A config file or shipped name, e.g. tiny.")
    flags.DEFINE_string("workdir", None, "Directory for config, metrics and checkpoints.")
    flags.DEFINE_bool(
        "allow_config_change",
        False,
        "Resume a run even though the model, data, optimizer or batch config changed.",
    )
    flags.mark_flags_as_required(["config", "workdir"])
    flags.register_validator("workdir", bool, "an empty --workdir would write the run here")


def initialize_processes() -> None:
    """Joins the other processes of a multi-process launch (nothing for a single process)."""
    if launched_as_several_processes():
        env = os.environ  # explicit launch: JAX_COORDINATOR_ADDRESS + these two; else detected
        if env.get("JAX_NUM_PROCESSES"):
            jax.distributed.initialize(
                num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"])
            )
        else:
            jax.distributed.initialize()


def main():
    initialize_processes()
    f = flags.FLAGS
    train(f.config, f.workdir, allow_config_change=f.allow_config_change)


if __name__ == "__main__":
    cli.run(main, define_flags)
