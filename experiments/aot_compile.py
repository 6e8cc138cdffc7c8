"""Ahead-of-time compile of the real train step for a virtual TPU slice: per-chip memory, no TPU.

  python -m experiments.aot_compile --config configs/paper.py:0.76b --topology v5p:2x2x2 \\
      --seq 4096 --batch 16
  python -m experiments.aot_compile --config configs/paper.py:7b --topology v5p:4x4x4 \\
      --seq 4096 --batch 64 --remat full
  python -m experiments.aot_compile --config configs/paper.py:0.76b --topology v5p:2x2x2 \\
      --sweep 1024,2048,4096,8192 --tokens_per_chip 8192

libtpu describes the slice (`jax.experimental.topologies.get_topology_desc`); the project's mesh is
built over its devices (`sharding.make_mesh`, by default every chip on `fsdp`), and
`TrainProgram.compile` lowers and compiles the full step (forward, backward, AdamW, donated state)
against `jax.ShapeDtypeStruct`s of the state and of a batch shaped like one synthetic batch built
on the host. Nothing is placed on the virtual devices; the host needs libtpu only.

`--batch` is the GLOBAL number of rows of `--seq` positions (default: one row per batch shard,
i.e. per data x fsdp mesh position); a batch shard holds batch / (data * fsdp) rows, one chip's
share when tensor = 1. `auto` attention means the TPU kernel (the target's, not this host's).

The last lines printed are, one each (per device: a chip, except on v4 topologies, which show each
TensorCore as a device with half the chip's HBM):
  argument_bytes_per_chip  the step's arguments: state shards + batch shard (TPU layouts included)
  temp_bytes_per_chip      XLA's temporaries: activations saved for the backward, gradients, ...
  peak_bytes_per_chip      from `compiled.memory_analysis()`:
                             argument + temp + output - alias
                           i.e. what the step holds at once: its arguments, its temporaries and
                           the outputs that do not reuse a donated argument's buffer (the new
                           state is aliased to the donated old one; the metrics are not)
  hbm_bytes_per_chip       the chip's HBM from the datasheet table `HBM_GIB` (XLA's own limit is
                           close: 15.75G on v5e, 95.74G on v5p)
  fits                     1 when the compile succeeded and peak <= HBM, else 0
  step_flops               model FLOPs of the whole step (all chips):
                           `flops.model_flops_per_token` * batch * seq (XLA's cost analysis counts
                           a scanned layer once, so it is not used)
  custom_calls             kernel custom-calls (e.g. `tpu_custom_call`, a Pallas kernel) in the
                           compiled HLO text: static ops, a call in the scanned layer counts once
  compile_s                seconds to lower and compile the step
A step too big for the chip either compiles (fits=0 from the figures) or makes XLA:TPU refuse it
with RESOURCE_EXHAUSTED, often within seconds: then the error is printed, temp is its "HLO
temporaries" figure (nan if it gives none), argument the bytes of the shardings, peak argument +
temp, custom_calls nan and fits=0. The exit status is 0 either way.
"""

import argparse
import collections
import contextlib
import functools
import importlib
import math
import os
import re
import sys
import time

import jax
import numpy as np

from transfusion_jax import sharding as shd
from transfusion_jax.attention import resolve_implementation
from transfusion_jax.config import load_config, resolve_model
from transfusion_jax.data.synthetic import SyntheticSource
from transfusion_jax.flops import model_flops_per_token
from transfusion_jax.model import parameter_counts
from transfusion_jax.train_step import TrainProgram

GIB = 2**30

# HBM per chip by jax's device_kind (public datasheets); the first substring that matches wins,
# so "TPU v5 lite" (v5e) precedes "TPU v5" (v5p, whose device_kind carries no "p").
HBM_GIB = (
    ("TPU v5 lite", 16),
    ("TPU v5e", 16),
    ("TPU v6 lite", 32),
    ("TPU v6e", 32),
    ("TPU v5p", 95),
    ("TPU v5", 95),
    ("TPU v4", 32),
)

# custom-call targets that are kernels (not XLA's own bookkeeping, e.g. Sharding markers)
KERNEL_TARGETS = ("tpu_custom_call", "mosaic", "triton", "cudnn", "cublas")

SIZE = r"([0-9.]+)\s*([KMGT]?)i?B?"
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def hbm_bytes(devices) -> float:
    """HBM of one device: its chip's, shared by the devices of a chip where the topology shows
    each TensorCore as a device (v4 here: 2 per chip; v5p's megacore is one device)."""
    coords = [getattr(d, "coords", None) for d in devices]
    per_chip = 1 if None in coords else len(devices) / len({tuple(c) for c in coords})
    for name, gib in HBM_GIB:
        if name in devices[0].device_kind:
            return gib * GIB / per_chip
    return float("nan")


def parse_mesh(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--mesh {text!r}: give data,fsdp,tensor, e.g. 1,-1,1")
    return tuple(parts)


def bytes_of(size: str, unit: str) -> float:
    return float(size) * UNITS[unit]


def oom_figures(message: str) -> dict:
    """Byte figures of XLA:TPU's out-of-memory error (its wording differs between versions)."""
    found = {}
    patterns = {
        "temporaries": rf"memory required for HLO temporaries \({SIZE}\) exceeds available HBM "
        rf"\({SIZE}\)",
        "used": rf"Used {SIZE} of {SIZE} hbm",
        "total": rf"[Tt]otal (?:hbm usage|memory required)\s*(?:>=|is|:)?\s*{SIZE}",
        "exceeded": rf"[Ee]xceeded hbm capacity by {SIZE}",
        "program": rf"\bprogram\s+{SIZE}",
        "arguments": rf"\barguments\s+{SIZE}",
    }
    for key, pattern in patterns.items():
        match = re.search(pattern, message)
        if match:
            found[key] = round(bytes_of(*match.groups()[:2]))
            if key in ("used", "temporaries"):
                found["limit"] = round(bytes_of(*match.groups()[2:4]))
    return found


def custom_call_targets(hlo_text: str) -> collections.Counter:
    return collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo_text))


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def make_config(args, seq: int, batch: int, shards: int = 1):
    cfg = load_config(args.config)
    cfg.train.batch_size = batch
    # The config's micro-batches (the 7b's 4) where they split this batch's rows per shard.
    accum = cfg.train.grad_accum_steps
    cfg.train.grad_accum_steps = args.grad_accum or (accum if batch % (accum * shards) == 0 else 1)
    cfg.data.seq_len = seq
    cfg.data.source = "synthetic"  # latents as the model sees them: no VAE, no files
    cfg.model.dtype = args.dtype or cfg.model.dtype
    cfg.model.remat_policy = args.remat or cfg.model.remat_policy
    # `auto` (the config default) follows the target, a TPU, not this host's backend.
    cfg.model.attention = resolve_implementation(args.attention or cfg.model.attention, "tpu")
    return resolve_model(cfg)


@contextlib.contextmanager
def tpu_target(attention: str):
    """Traces the step as it would be traced on a TPU host, though this host's backend is a CPU:
    the model's accelerator layout (`transformer.compiling_for_accelerator`, where the model has
    one: on a CPU the residual stream is carried flat) and the Pallas kernel compiled, not
    interpreted (`tpu_flash.flash_attention` picks interpret mode from the default backend)."""
    from transfusion_jax import transformer

    with contextlib.ExitStack() as stack:
        layout = getattr(transformer, "compiling_for_accelerator", None)
        if layout is not None:
            stack.enter_context(layout())
        if attention == "tpu_flash":
            module = importlib.import_module("transfusion_jax.kernels.tpu_flash")
            original = module.flash_attention
            module.flash_attention = functools.partial(original, interpret=False)
            stack.callback(setattr, module, "flash_attention", original)
        yield


def batch_shapes(cfg):
    """ShapeDtypeStructs of one synthetic batch of cfg.train.batch_size rows (built on the host)."""
    local = next(SyntheticSource(cfg, cfg.train.batch_size))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), local)


def measure(args, devices, seq: int, batch: int | None, log=print) -> dict:
    """Compiles one step; returns the figures of the last printed lines (nan where unknown)."""
    data, fsdp, tensor = args.mesh
    mesh = shd.make_mesh(data, fsdp, tensor, devices=devices)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = batch or shards
    if batch % shards:
        raise ValueError(f"--batch {batch}: not divisible by data x fsdp = {shards} batch shards")
    cfg = make_config(args, seq, batch, shards)
    counts = parameter_counts(cfg)
    model = cfg.model
    log(
        f"config={args.config} params={counts['total']} ({counts['total'] / 1e9:.2f}B) "
        f"depth={model.depth} d_model={model.d_model} heads={model.num_heads} "
        f"dtype={model.dtype} remat={model.remat_policy} attention={model.attention} "
        f"grad_accum={cfg.train.grad_accum_steps}"
    )
    log(
        f"mesh={dict(mesh.shape)} batch={batch} rows_per_batch_shard={batch / shards:g} seq={seq} "
        f"tokens_per_chip={batch * seq / mesh.size:g}"
    )
    t0 = time.perf_counter()
    program = TrainProgram(cfg, mesh)
    shapes = batch_shapes(cfg)
    abstract_batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=program.batch_sharding), shapes
    )
    abstract_state = program.abstract_state()
    state_bytes = shard_bytes(abstract_state)
    argument_bytes = state_bytes + shard_bytes(abstract_batch)
    log(
        f"program_s={time.perf_counter() - t0:.1f} state_gib_per_chip={state_bytes / GIB:.3f} "
        f"batch_mib_per_chip={(argument_bytes - state_bytes) / 2**20:.2f}"
    )
    tokens = batch * seq
    out = dict(
        argument_bytes_per_chip=argument_bytes,
        temp_bytes_per_chip=float("nan"),
        peak_bytes_per_chip=float("nan"),
        hbm_bytes_per_chip=hbm_bytes(devices),
        fits=0,
        step_flops=model_flops_per_token(cfg, seq, counts) * tokens,
        custom_calls=float("nan"),
        compile_s=float("nan"),
    )
    log(f"compiling the train step for {mesh.size} x {devices[0].device_kind} ...", flush=True)
    t0 = time.perf_counter()
    try:
        with tpu_target(cfg.model.attention):
            compiled = program.compile(shapes)
    except Exception as e:  # XlaRuntimeError / JaxRuntimeError, whose class moved between versions
        out["compile_s"] = time.perf_counter() - t0
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        log("RESOURCE_EXHAUSTED: the step does not fit; XLA says:")
        for line in lines[:30]:
            log(f"  | {line}")
        figures = oom_figures(message)
        for key, value in figures.items():
            log(f"oom_{key}_gib={value / GIB:.2f}")
        temp = figures.get("temporaries", figures.get("program"))
        if temp is not None:
            out["temp_bytes_per_chip"] = temp
        total = figures.get("used", figures.get("total"))
        if total is None and temp is not None:
            total = argument_bytes + temp  # the new state reuses the donated one's buffers
        if total is not None:
            out["peak_bytes_per_chip"] = total
        return out
    out["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out["argument_bytes_per_chip"] = mem.argument_size_in_bytes
    out["temp_bytes_per_chip"] = mem.temp_size_in_bytes
    out["peak_bytes_per_chip"] = (
        mem.argument_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
    )
    out["fits"] = int(out["peak_bytes_per_chip"] <= out["hbm_bytes_per_chip"])
    targets = custom_call_targets(compiled.as_text())
    out["custom_calls"] = sum(
        n for t, n in targets.items() if any(k in t.lower() for k in KERNEL_TARGETS)
    )
    log(
        f"memory_analysis: argument={mem.argument_size_in_bytes / GIB:.3f}GiB "
        f"output={mem.output_size_in_bytes / GIB:.3f}GiB "
        f"alias={mem.alias_size_in_bytes / GIB:.3f}GiB "
        f"temp={mem.temp_size_in_bytes / GIB:.3f}GiB "
        f"code={getattr(mem, 'generated_code_size_in_bytes', 0) / 2**20:.1f}MiB"
    )
    log(f"custom_call_targets={dict(targets) or '{}'}")
    return out


def format_value(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("--config", default="configs/paper.py:0.76b")
    parser.add_argument(
        "--topology", default="v5p:2x2x2", help="libtpu topology name, e.g. v5p:2x2x2, v5e:4x4"
    )
    parser.add_argument("--seq", type=int, default=4096, help="row length")
    parser.add_argument(
        "--batch",
        type=int,
        help="GLOBAL rows per step (default: one row per data x fsdp batch shard)",
    )
    parser.add_argument(
        "--mesh",
        type=parse_mesh,
        default=(1, -1, 1),
        help="data,fsdp,tensor; one may be -1 (default 1,-1,1: every chip on fsdp)",
    )
    parser.add_argument("--dtype", help="compute dtype override, e.g. bfloat16")
    parser.add_argument(
        "--remat", help="remat policy override: none, full, dots, dots_with_no_batch_dims"
    )
    parser.add_argument(
        "--attention",
        help="xla, tpu_flash or auto (= tpu_flash, for the TPU target; default: the config's)",
    )
    parser.add_argument(
        "--grad_accum", type=int, default=0, help="micro-batches per step (default: the config's)"
    )
    parser.add_argument(
        "--sweep",
        help="comma-separated seqs: one compile each at --tokens_per_chip, one row printed each",
    )
    parser.add_argument(
        "--tokens_per_chip",
        type=int,
        default=8192,
        help="--sweep: global rows = tokens_per_chip * chips / seq",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # libtpu takes /tmp/libtpu_lockfile for the chips of a TPU host; describing a topology needs
    # no chip, so a second compile (or a training run on this host) must not be refused.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    t0 = time.perf_counter()
    topology = topologies.get_topology_desc(platform="tpu", topology_name=args.topology)
    devices = list(topology.devices)
    print(
        f"topology={args.topology} devices={len(devices)} kind={devices[0].device_kind} "
        f"hbm_gib_per_chip={hbm_bytes(devices) / GIB:g} "
        f"({time.perf_counter() - t0:.1f}s)",
        flush=True,
    )
    if args.sweep:
        rows = []
        data, fsdp, tensor = args.mesh
        for seq in [int(s) for s in args.sweep.split(",")]:
            mesh = shd.make_mesh(data, fsdp, tensor, devices=devices)
            shards = mesh.shape["data"] * mesh.shape["fsdp"]
            batch = args.tokens_per_chip * mesh.size // seq
            if batch < 1 or batch % shards:
                print(
                    f"seq={seq}: {args.tokens_per_chip} tokens per chip make {batch} rows, not "
                    f"a multiple of the {shards} batch shards; skipped"
                )
                continue
            out = measure(args, devices, seq, batch)
            rows.append((seq, batch, out))
            print(
                f"row seq={seq} batch={batch} "
                f"temp_gib={out['temp_bytes_per_chip'] / GIB:.2f} "
                f"peak_gib={out['peak_bytes_per_chip'] / GIB:.2f} fits={out['fits']} "
                f"custom_calls={format_value(out['custom_calls'])} "
                f"compile_s={out['compile_s']:.1f}",
                flush=True,
            )
        print("| seq | global batch | temp GiB/chip | peak GiB/chip | fits | compile s |")
        print("|---|---|---|---|---|---|")
        for seq, batch, out in rows:
            print(
                f"| {seq} | {batch} | {out['temp_bytes_per_chip'] / GIB:.2f} | "
                f"{out['peak_bytes_per_chip'] / GIB:.2f} | {out['fits']} | "
                f"{out['compile_s']:.1f} |"
            )
        return 0
    out = measure(args, devices, args.seq, args.batch)
    for key, value in out.items():
        print(f"{key}={format_value(value)}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
