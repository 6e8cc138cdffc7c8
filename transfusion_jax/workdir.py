"""What a run directory promises: one trainer at a time, one config per run, clean records.

- `WorkdirLock`: an exclusive `fcntl.flock` on DIR/lock, held for the whole run. The kernel
  drops it when its process ends, even by kill -9, so a crash never leaves a stale lock; the
  file names the holder (host, pid, start time) for the message that refuses a second trainer.
  flock works on local disks and on NFS v4 / Filestore; FUSE bucket mounts (gcsfuse) ignore it,
  and an object store's URL (gs://) has nothing to lock (a warning says so), so on those the
  user keeps one trainer per directory.
- `config_changes`: what differs between the config a run's checkpoints were trained with and
  the one it is resumed with, split into changes that leave the run the same run (steps, logging,
  mesh, memory/speed choices) and changes that would silently mix two runs (model, data,
  optimizer, batch).
- `trim_metrics`: metrics.jsonl cut back to its complete records at or below the restored step,
  so the steps a crash makes the run replay are not logged twice and a torn last line (a full
  disk) is not appended onto.
"""

import dataclasses
import datetime
import fcntl
import json
import logging
import os
import socket

from transfusion_jax.config import base_config
from transfusion_jax.paths import as_path, is_local, write_atomically

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A failure the user can act on: the CLI prints its one-line message, with no traceback,
    and exits with `exit_status` (2: refused before anything ran, 1: the run failed)."""

    exit_status = 1


class WorkdirLockedError(RunError):
    exit_status = 2


class ConfigChangedError(RunError):
    exit_status = 2


class WorkdirLock:
    """Holds DIR/lock exclusively until `release()` (or the process's end). An object store
    (gs://) has no locks, and an object written there as one would outlive a killed run: there
    it warns, once, and locks nothing."""

    warned = False

    def __init__(self, workdir):
        self.path = as_path(workdir) / "lock"
        self._file = None
        if not is_local(self.path):
            if not WorkdirLock.warned:
                log.warning(
                    "--workdir %s is in an object store, which has no file locks: nothing "
                    "prevents a second trainer on the same directory; run one at a time",
                    workdir,
                )
                WorkdirLock.warned = True
            return
        self._file = open(self.path, "a+")  # noqa: SIM115 - held open for the whole run
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise WorkdirLockedError(
                f"--workdir {workdir} is in use by {holder}; wait for that run to end (or stop "
                f"it), or give another --workdir"
            ) from None
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}\n")
        self._file.flush()

    def release(self) -> None:
        if self._file is not None and not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


# Keys a resumed run may change: how long, how often to log and save, where it runs, and how it
# trades memory for speed. Everything else changes what is being trained.
RESUMABLE_KEYS = (
    "train.num_steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.tensorboard",
    "train.wandb_project",
    "train.peak_tflops",
    "train.nan_policy",
    "train.max_nonfinite_streak",
    "train.grad_accum_steps",
    "train.eval_every",
    "train.eval_suites",
    "eval.",
    "train.eval_images",
    "train.stats_images",
    "mesh.",
    "model.remat_policy",
    "model.attention",
    "model.dtype",
    "data.num_threads",
    "data.prefetch",
    "data.path",  # the same data at a new place (a new machine, another mount): warned
    "data.text_path",
    "data.tfds_data_dir",
    "data.recipe",  # start-up warnings only
)


def legacy_values(saved: dict) -> dict:
    """Keys added with a default that changes what older runs did, with the value a saved config
    without them had: a run that trained on a folder, TFDS or text file trained on the records
    now held out (percent 0). The shapes data holds nothing out, so its runs resume as before."""
    splits = saved.get("data.source") in ("imagefolder", "tfds", "text")
    return {"data.held_out_percent": 0.0} if splits or saved.get("data.text_path") else {}


def fill_legacy(cfg, stored: dict) -> None:
    """Sets in `cfg` (defaults updated with a stored config) the legacy values of the keys the
    stored config lacks: an old run is read as what it was, not as today's defaults."""
    flat = _flatten(stored)
    for key, value in legacy_values(flat).items():
        section, name = key.split(".")
        if key not in flat and section in cfg and name in cfg[section]:
            cfg[section][name] = value


@dataclasses.dataclass
class ConfigChanges:
    allowed: dict  # key -> (saved, new)
    refused: dict

    def describe(self, which: str) -> str:
        changes = getattr(self, which)
        return ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in sorted(changes.items()))

    @property
    def data_changed(self) -> bool:
        """The data stream is another one: its saved iterator state does not apply."""
        return any(k.startswith("data.") or k == "train.seed" for k in self.refused)


def config_changes(saved: dict, new: dict, default_config=None) -> ConfigChanges:
    """Differences between two configs as JSON dicts (what DIR/config.json holds). A key the
    saved config lacks (added to the project since) counts as unchanged while it keeps its
    default (in `default_config`, base_config() unless given); optimizer.decay_steps may be set
    to the decay the run already had."""
    a, b = _flatten(saved), _flatten(new)
    a = {**{k: v for k, v in legacy_values(a).items() if k in b}, **a}
    default_config = base_config() if default_config is None else default_config
    defaults = _flatten(json.loads(default_config.to_json_best_effort()))
    allowed, refused = {}, {}
    for key in sorted(set(a) | set(b)):
        before, after = a.get(key, "<unset>"), b.get(key, "<unset>")
        if before == "<unset>" and key in defaults and after == defaults[key]:
            continue
        if key == "optimizer.decay_steps" and before == 0 and after == a.get("train.num_steps"):
            allowed[key] = (before, after)  # the same schedule, now pinned
            continue
        if before != after:
            resumable = any(_matches(key, k) for k in RESUMABLE_KEYS)
            (allowed if resumable else refused)[key] = (before, after)
    return ConfigChanges(allowed, refused)


def config_as_json(cfg) -> dict:
    """The config as DIR/config.json stores it (tuples become lists), for comparisons."""
    return json.loads(cfg.to_json_best_effort())


def write_config(workdir, cfg, resumed_step: int | None) -> None:
    """Writes DIR/config.json (for people and tools; each checkpoint stores its own config). A
    different config already there is kept as config.step_N.json, N = the step this run resumed
    from; an existing config.step_N.json is the one that trained up to N and is never replaced."""
    workdir = as_path(workdir)
    path = workdir / "config.json"
    text = cfg.to_json_best_effort(indent=2) + "\n"
    if path.is_file():
        previous = path.read_bytes()
        kept = workdir / f"config.step_{resumed_step or 0}.json"
        if previous != text.encode() and not kept.exists():
            write_atomically(kept, previous)
    write_atomically(path, text)


def trim_metrics(path, last_step: int) -> int:
    """Keeps the complete JSON records of metrics.jsonl with step <= last_step; returns how many
    lines were dropped (replayed steps, a torn line)."""
    path = as_path(path)
    if not path.is_file():
        return 0
    data = path.read_bytes()
    kept, dropped = [], 0
    for line in data.split(b"\n")[:-1]:  # the part after the last newline is torn
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and int(record.get("step", -1)) <= last_step
        except (ValueError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    dropped += data.rsplit(b"\n", 1)[-1] != b""
    if dropped:
        write_atomically(path, b"".join(line + b"\n" for line in kept))
    return dropped


def _matches(key: str, pattern: str) -> bool:
    """ "mesh." matches every key of the mesh section; other patterns match one key."""
    return key.startswith(pattern) if pattern.endswith(".") else key == pattern


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
