"""Train-step throughput on synthetic batches: tokens/s, model TFLOP/s, MFU and peak memory.

  python -m experiments.bench_train --preset reference          # the shared comparison point
  python -m experiments.bench_train --config configs/tiny.py --grad_only
  python -m experiments.bench_train --config configs/paper.py:0.76b --seq 4096 --batch 8
  python -m experiments.bench_train --config configs/paper.py:0.76b --seq 4096 --batch 8 \
      --attention gpu_flash

`--preset reference`: width 512, depth 8, 8 heads of 64, text vocab 1024, linear patch layers,
batch 8, each row one document of 64 text positions (BOS, 61 caption tokens, BOI, EOI) and one
16x16x8 latent in 2x2 patches (64 positions), float32. MFU is measured against `--peak_tflops`
if given, else the device's known bf16 peak, else (CPU) a matmul probe in the step's dtype on the
same device.
The full step (forward, backward, AdamW, all devices of the mesh) is timed; `--grad_only` times
forward + backward alone. Figures are medians over `--steps` timed steps after two warm-up steps.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from transfusion_jax import sharding as shd
from transfusion_jax.batch import Image, SpecialTokens, build_batch
from transfusion_jax.config import load_config, resolve_model
from transfusion_jax.data.synthetic import SyntheticSource
from transfusion_jax.flops import device_peak_tflops, model_flops_per_token
from transfusion_jax.model import parameter_counts
from transfusion_jax.train_step import TrainProgram


def reference_config():
    cfg = load_config("configs/tiny.py")
    cfg.model.update(vocab_size=1024, d_model=512, depth=8, num_heads=8, remat_policy="none")
    cfg.image.update(latent_size=16, latent_channels=8, patch_size=2, max_images=1)
    cfg.patch.kind = "linear"  # the paper's main variant
    cfg.data.seq_len = 128
    cfg.train.batch_size = 8
    return cfg


def reference_batch(cfg):
    rng = np.random.default_rng(0)
    special = SpecialTokens()
    rows = []
    for _ in range(cfg.train.batch_size):
        caption = [special.bos, *rng.integers(5, cfg.model.vocab_size, 61)]
        latent = rng.normal(size=(16, 16, 8)).astype(np.float32)
        rows.append([[caption, Image(latent)]])
    return build_batch(rows, 128, 1, (16, 16, 8), 2, special)


def matmul_peak_tflops(dtype, n: int, repeats: int = 5) -> float:
    """Measured matmul throughput of one device, TFLOP/s (median of `repeats`)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e12


def timed(fn, steps):
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["reference"])
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--batch", type=int, help="global rows per step (default: config's)")
    parser.add_argument("--seq", type=int, help="row length (default: config's)")
    parser.add_argument("--dtype", help="compute dtype override, e.g. bfloat16")
    parser.add_argument("--remat", help="remat policy override")
    parser.add_argument("--attention", help="model.attention override: xla, cudnn, gpu_flash, ...")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak_tflops", type=float, default=0.0)
    parser.add_argument("--grad_only", action="store_true")
    args = parser.parse_args()

    cfg = reference_config() if args.preset else load_config(args.config)
    cfg.train.batch_size = args.batch or cfg.train.batch_size
    cfg.data.seq_len = args.seq or cfg.data.seq_len
    cfg.data.source = "synthetic"  # latents as the model sees them: no VAE, no files
    cfg.model.dtype = args.dtype or cfg.model.dtype
    cfg.model.remat_policy = args.remat or cfg.model.remat_policy
    cfg.model.attention = args.attention or cfg.model.attention
    cfg = resolve_model(cfg)
    mesh = shd.mesh_from_config(cfg)
    program = TrainProgram(cfg, mesh)
    if args.preset:
        local = reference_batch(cfg)
    else:
        local = next(SyntheticSource(cfg, cfg.train.batch_size))
    batch = shd.global_batch(local, mesh)
    state = program.init_state(0)

    t0 = time.perf_counter()
    if args.grad_only:
        grad = jax.jit(lambda s, b: program._gradients(s.params, b, jax.random.key(0)))
        compiled = grad.lower(state, batch).compile()
        step = lambda: compiled(state, batch)
    else:
        compiled = program.compile(batch)
        holder = [state]

        def step():
            holder[0], metrics = compiled(holder[0], batch)
            return metrics

    compile_s = time.perf_counter() - t0
    timed(step, 2)  # warm-up
    step_s = timed(step, args.steps)

    counts = parameter_counts(cfg)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    tokens_per_s = tokens / step_s
    flops_per_token = model_flops_per_token(cfg, cfg.data.seq_len, counts)
    tflops = flops_per_token * tokens_per_s / 1e12
    device = jax.devices()[0]
    peak, peak_from = args.peak_tflops, "flag"
    if not peak and device_peak_tflops(device):
        peak, peak_from = device_peak_tflops(device), f"{device.device_kind} bf16 datasheet"
    if not peak:
        n = 2048 if device.platform == "cpu" else 8192
        peak = matmul_peak_tflops(jnp.dtype(cfg.model.dtype), n)
        peak_from = f"{cfg.model.dtype} matmul probe n={n}"
    xla_flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    memory = device.memory_stats() or {}

    name = "reference" if args.preset else args.config
    print(
        f"config={name} params={counts['total']} batch={cfg.train.batch_size} "
        f"seq={cfg.data.seq_len} dtype={cfg.model.dtype} remat={cfg.model.remat_policy} "
        f"attention={cfg.model.attention} "
        f"mode={'grad' if args.grad_only else 'train_step'}"
    )
    print(
        f"backend={jax.default_backend()} device={device.device_kind} devices={mesh.size} "
        f"mesh={dict(mesh.shape)}"
    )
    print(f"compile_s={compile_s:.1f} median_step_s={step_s:.4f}")
    print(
        f"model_flops_per_token={flops_per_token:.4g} xla_flops_per_step={xla_flops:.4g} "
        f"model_flops_per_step={flops_per_token * tokens:.4g}"
    )
    print(f"tokens_per_s={tokens_per_s:.0f}")
    print(f"model_tflops_per_s={tflops:.4f}")
    print(f"peak_tflops={peak:.4f} ({peak_from})")
    print(f"mfu={tflops / (peak * mesh.size):.3f}")
    if "peak_bytes_in_use" in memory:
        print(f"peak_memory_gib={memory['peak_bytes_in_use'] / 2**30:.2f}")
    else:
        print("peak_memory_gib=n/a (backend reports none)")


if __name__ == "__main__":
    main()
