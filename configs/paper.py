"""The paper's five model sizes with either patch encoder, at any of its patch sizes.

`--config configs/paper.py:0.76b` (linear 2x2 patches, the default),
`--config configs/paper.py:0.76b,unet`, and with a patch size (p1, p2, p4 or p8; the paper's
Table 6): `--config configs/paper.py:0.76b,unet,p4`. The U-Net keeps about 0.27B parameters at
every patch size, as in the paper: a larger patch adds U-Net levels, so the widths shrink
(`UNET_CHANNELS`, from the rule `config.matched_unet_channels`).
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
(Those figures predate `image.max_images` = 0, derived: 15 image slots per 4096-position row of
2x2-patch images where they had 8.)

The paper's data, which a run must be given (`data.recipe = "paper"`: the trainer warns at start
about what is missing):
  --config.image.vae_path=PATH       the 8-channel VAE (a diffusers AutoencoderKL directory or a
                                     train_vae workdir of configs/vae_paper.py)
  --config.data.tokenizer=sentencepiece:PATH/tokenizer.model
                                     the Llama-2 SentencePiece tokenizer (32K + specials, padded:
                                     model.vocab_size); the default byte tokenizer wastes it
  --config.data.text_path=CORPUS     text-only documents, mixed 1:1 with the image-caption ones
                                     (data.text_ratio = 1.0) whenever given
Guidance: eval.cfg_scale is the ablations' 3 (`config.CFG_SCALE_ABLATION`, also the default of
`Pipeline` and `sample --cfg_scale`); the Chameleon comparison used 5
(`config.CFG_SCALE_CHAMELEON_COMPARISON`: --config.eval.cfg_scale=5, sample --cfg_scale 5).
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

PATCH_OPTIONS = {"p1": 1, "p2": 2, "p4": 4, "p8": 8}

# U-Net widths per patch size, log2(k) + 1 levels: (640, 1280) at 2x2 patches is the paper's
# ~0.27B U-Net, and the others have about as many parameters (0.254-0.273B at every model size):
# `matched_unet_channels(cfg, k)` of these configs (tests/test_ablation_configs.py checks both).
UNET_CHANNELS = {
    1: (1408,),
    2: (640, 1280),
    4: (512, 896, 960),
    8: (448, 768, 768, 768),
}


def get_config(arg=None):
    size, *options = (arg or "0.76b").split(",")
    if size not in SIZES:
        raise ValueError(f"configs/paper.py: size {size!r} is not one of {tuple(SIZES)}")
    kind, patch_size = "linear", 2
    for option in options:
        if option in ("linear", "unet"):
            kind = option
        elif option in PATCH_OPTIONS:
            patch_size = PATCH_OPTIONS[option]
        else:
            raise ValueError(
                f"configs/paper.py: {option!r} in {arg!r} is not a patch kind (linear, unet) or "
                f"a patch size ({', '.join(PATCH_OPTIONS)}); e.g. paper:0.76b,unet,p4"
            )
    c = base_config()
    c.model.depth, c.model.d_model, c.model.num_heads = SIZES[size]
    c.model.dtype = "bfloat16"
    c.patch.kind = kind
    c.image.patch_size = patch_size
    c.patch.unet_channels = UNET_CHANNELS[patch_size]  # set for either kind: kind=unet follows
    c.image.max_images = 0  # derived: as many image slots as a row holds at this patch size
    c.train.batch_size = BATCH_ROWS.get(size, c.train.batch_size)
    c.train.grad_accum_steps = GRAD_ACCUM_STEPS.get(size, 1)
    # The paper's latent space: give the VAE with --config.image.vae_path=PATH (a diffusers
    # AutoencoderKL directory or a train_vae workdir of configs/vae_paper.py).
    c.data.latents = "vae"
    # The paper's text: Llama-2's SentencePiece tokenizer (model.vocab_size is its 32K + special
    # tokens), --config.data.tokenizer=sentencepiece:PATH/tokenizer.model, and a text corpus
    # mixed 1:1, --config.data.text_path=CORPUS. The trainer warns at start about either missing.
    c.data.recipe = "paper"
    return c
