"""The paper's five model sizes with either patch encoder.

`--config configs/paper.py:0.76b` (linear 2x2 patches, the default) or
`--config configs/paper.py:0.76b,unet`.
Sizes (layers / width / heads): 0.16b 16/768/12, 0.37b 24/1024/16, 0.76b 24/1536/24,
1.4b 24/2048/16, 7b 32/4096/32; FFN by the Llama-2 rule, untied 32K embeddings, 256x256 images as
32x32x8 latents, 4096-token rows.

Per-size defaults follow ahead-of-time compiles of the train step for a TPU v5p:4x4x4 slice (64
chips, 95 GiB each; `experiments/aot_compile.py`, figures in docs/aot_results.md): flash
attention (`model.attention = auto`), every chip on `fsdp`, remat `dots_with_no_batch_dims`. The
paper's 2M-token batches (512 rows) are 8 rows per chip there and fit in one pass for 0.16b-1.4b
(1.4b: 44.5 GiB); the 7b's 4M-token batches (1024 rows, 16 per chip) run as 4 micro-batches
of 4 rows per chip (51.9 GiB). Other slices: check with the tool, and change
`train.grad_accum_steps` (memory) or `model.remat_policy=full` (a third more FLOPs) to fit.
"""

from transfusion_jax.config import base_config

# The paper's global batch in 4096-token rows, and micro-batches per step, where not the default
# (512 rows, one pass).
BATCH_ROWS = {"7b": 1024}
GRAD_ACCUM_STEPS = {"7b": 4}

SIZES = {
    "0.16b": (16, 768, 12),
    "0.37b": (24, 1024, 16),
    "0.76b": (24, 1536, 24),
    "1.4b": (24, 2048, 16),
    "7b": (32, 4096, 32),
}


def get_config(arg=None):
    size, _, kind = (arg or "0.76b").partition(",")
    if size not in SIZES:
        raise ValueError(f"configs/paper.py: size {size!r} is not one of {tuple(SIZES)}")
    c = base_config()
    c.model.depth, c.model.d_model, c.model.num_heads = SIZES[size]
    c.model.dtype = "bfloat16"
    c.patch.kind = kind or "linear"
    c.image.max_images = 8
    c.train.batch_size = BATCH_ROWS.get(size, c.train.batch_size)
    c.train.grad_accum_steps = GRAD_ACCUM_STEPS.get(size, 1)
    # The paper's latent space: give the VAE with --config.image.vae_path=PATH (a diffusers
    # AutoencoderKL directory or a train_vae workdir of configs/vae_paper.py).
    c.data.latents = "vae"
    return c
