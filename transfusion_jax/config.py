"""Every configuration key with its default, and the checks that turn bad values into clear errors.

Config files in `configs/` start from `base_config()` and override what they change, so a key is
documented once, here, by the comment on (or just above) its line.

  python -m transfusion_jax.configs tiny       # every key: its value in that config and meaning
"""

import importlib.resources
import importlib.util
import inspect
import itertools
import math
import pathlib
import re

import ml_collections

from transfusion_jax.attention import IMAGE_ATTENTION, IMPLEMENTATIONS

IMAGE_REPRESENTATIONS = ("continuous", "discrete")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")  # diffusion.timestep_sampling


def llama_ffn_dim(d_model: int) -> int:
    """The Llama-2 FFN width rule, 256 * ceil(8d / 3 / 256): 768 -> 2048, 4096 -> 11008."""
    return 256 * math.ceil(8 * d_model / 3 / 256)


# The paper's classifier-free guidance scales: 3 in its ablations, 5 in the comparison with
# Chameleon (Table 3). The ablation scale is the default everywhere (eval.cfg_scale, `Pipeline`,
# `python -m transfusion_jax.sample --cfg_scale`); pass the comparison scale where it applies.
CFG_SCALE_ABLATION = 3.0
CFG_SCALE_CHAMELEON_COMPARISON = 5.0


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.vocab_size = 32_000 + 128  # Llama-2 32K + special tokens, padded to a multiple of 128.
    c.model.d_model = 768  # Width of the residual stream.
    c.model.depth = 16  # Transformer layers.
    c.model.num_heads = 12  # Attention (query) heads.
    # 0 = num_heads (plain multi-head attention); fewer = grouped KV heads.
    c.model.num_kv_heads = 0
    c.model.head_dim = 0  # 0 = d_model // num_heads.
    c.model.ffn_dim = 0  # 0 = the Llama-2 rule, llama_ffn_dim(d_model).
    c.model.qk_norm = False  # The paper has none (it was one of Chameleon's stability changes).
    c.model.tie_embeddings = False  # Share the input embedding with the output head.
    c.model.rope_theta = 10_000.0  # RoPE base frequency.
    c.model.norm_eps = 1e-5  # RMSNorm epsilon.
    c.model.param_dtype = "float32"  # Master weights (and optimizer state) dtype.
    c.model.dtype = "float32"  # Compute dtype: "bfloat16" for mixed precision with f32 weights.
    # Which activations the backward pass keeps (see transformer.REMAT_POLICIES).
    c.model.remat_policy = "dots_with_no_batch_dims"
    # The attention implementation: xla, cudnn, tpu_flash, gpu_flash, or auto (the flash kernel of
    # TPUs and GPUs, xla on CPUs). See transfusion_jax/attention.py.
    c.model.attention = "auto"
    # "bidirectional": a patch sees its whole image (the paper); "causal": like text (Table 5).
    c.model.image_attention = "bidirectional"
    # "continuous": images are diffused latents (Transfusion); "discrete": images are the code ids
    # of a VQ tokenizer (image.vae_path), predicted token by token with the LM loss only and
    # causal attention everywhere: the Chameleon baseline (transfusion_jax/discrete.py).
    c.model.image_repr = "continuous"

    c.image = ml_collections.ConfigDict()
    # h = w of one image's latent (256 px / 8 for the paper's VAE); 0 = follow the data (in pixel
    # space: data.image_size).
    c.image.latent_size = 32
    c.image.latent_channels = 8  # 0 = follow the data (in pixel space: 3, RGB).
    c.image.patch_size = 2  # k: each k x k latent window is one sequence position.
    # Image slots per packed row (M); unused slots are masked, but the patch layers (and a VAE
    # encoding pixels on the devices) still run on them. 0 = derived, `derived_max_images`: as
    # many as the shortest image documents a row holds, so slots never close a row early.
    c.image.max_images = 0
    # data.latents = "vae": a diffusers AutoencoderKL directory or a train_vae workdir; with
    # model.image_repr = "discrete": the VQ tokenizer's train_vae workdir (vae.kind = "vq").
    c.image.vae_path = ""
    # Discrete images: codes in the tokenizer's codebook, the ids appended to the text vocabulary
    # (0 = read it from image.vae_path; give it for shape-only uses without a tokenizer).
    c.image.codebook_size = 0
    # Discrete images: the tokenizer checkpoint the run trains on, fixed when the run starts (0 =
    # its newest then), so resuming, sampling and evaluating read the same codes.
    c.image.vae_step = 0
    # Train on a posterior sample z ~ N(mean, var) (latent diffusion's choice) or on the mean.
    c.image.vae_sample = True

    c.patch = ml_collections.ConfigDict()
    c.patch.kind = "linear"  # "linear" (the paper's main variant) or "unet".
    c.patch.time_embed_dim = 256  # Width of the sinusoidal timestep features.
    # U-Net only: one width per resolution level; log2(patch_size) + 1 levels are used.
    # (640, 1280) at 2x2 patches gives the paper's ~0.27B U-Net; more levels add parameters
    # (`matched_unet_channels`: widths of one U-Net size at every patch size).
    c.patch.unet_channels = (640, 1280, 1280, 1280)
    c.patch.unet_blocks = 2  # ResNet blocks per level (the paper's "2-block" U-Net).
    # Self-attention after each ResNet block at levels of at most this many pixels a side (full
    # attention over 32x32 positions costs more than the rest of a small U-Net; 0 = none).
    c.patch.unet_attention_resolution = 16
    c.patch.unet_head_dim = 64  # U-Net only: width of each attention head.

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.objective = "epsilon"  # "epsilon" (the paper, DDPM) or "flow" (rectified flow).
    c.diffusion.num_timesteps = 1000  # T, the DDPM schedule's steps (flow: time resolution).
    c.diffusion.loss_weight = 5.0  # lambda in L = L_LM + lambda * L_diffusion.
    c.diffusion.noise_limit = 500  # Images flagged `noise_limited` draw t < noise_limit.
    c.diffusion.cond_drop_rate = 0.1  # Caption dropout for classifier-free guidance.
    # How training draws t: "uniform" (the paper) or "logit_normal" (t / T = sigmoid(n) with
    # n ~ N(0, 1), as SD3 trains rectified flow: more draws at the middle noise levels).
    c.diffusion.timestep_sampling = "uniform"

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 250_000  # Optimizer steps of the whole run.
    c.train.batch_size = 512  # Global, in packed rows (512 x 4096 = the paper's 2M tokens).
    c.train.grad_accum_steps = 1  # Micro-batches per optimizer step (each batch_size / this).
    c.train.log_every = 50  # Steps between metrics records (and progress lines).
    c.train.checkpoint_every = 1000  # Steps between checkpoints (and at the end).
    c.train.keep_checkpoints = 3  # Newest checkpoints kept (older ones are deleted).
    c.train.seed = 0  # Seeds the weights, the data order and the diffusion noise.
    c.train.ema_decay = 0.0  # 0 = no EMA copy of the weights; e.g. 0.9999 keeps one.
    # A non-finite loss is never applied; "stop" ends the run, "skip" goes on (the step is
    # skipped and counted in nonfinite_steps).
    c.train.nan_policy = "stop"
    # "skip" still gives up (exit status 1) after this many non-finite steps in a row: a model
    # whose every step explodes is not training, and its checkpoints would rotate out good ones.
    c.train.max_nonfinite_streak = 10
    c.train.tensorboard = False  # Also write TensorBoard event files (needs tensorboardX).
    c.train.wandb_project = ""  # Also log to this Weights & Biases project (needs wandb).
    c.train.peak_tflops = 0.0  # Per-device peak for MFU; 0 = look the device up (or no MFU).
    c.train.eval_every = 0  # Steps between evaluations of eval_suites (0 = none; also at the end).
    # Suites run during training, comma-separated (see transfusion_jax.evaluate): the cheap ones
    # are "diffusion" and "text" (forward passes), "shapes" and "captions" (generation).
    c.train.eval_suites = "diffusion,text"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1  # Pure data parallelism (weights replicated).
    c.mesh.fsdp = -1  # Data parallelism with sharded weights; -1 = the remaining devices.
    c.mesh.tensor = 1  # Tensor parallelism over heads and MLP width.

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.peak_lr = 3e-4  # AdamW learning rate after warm-up.
    c.optimizer.min_lr = 1.5e-5  # End of the cosine decay.
    c.optimizer.warmup_steps = 4000  # Linear warm-up from 0.
    c.optimizer.decay_steps = 0  # 0 = train.num_steps.
    c.optimizer.b1 = 0.9  # Adam beta1.
    c.optimizer.b2 = 0.95  # Adam beta2.
    c.optimizer.eps = 1e-8  # Adam epsilon.
    c.optimizer.weight_decay = 0.1  # Decoupled, on matrices and embeddings only.
    c.optimizer.clip_norm = 1.0  # Global gradient-norm clip.

    c.data = ml_collections.ConfigDict()
    # "shapes" (built in), "imagefolder" (data.path), "tfds" (data.tfds_*), "text"
    # (data.text_path), or "synthetic" (random classes, for benchmarks).
    c.data.source = "shapes"
    c.data.seq_len = 4096  # L, the packed row length.
    c.data.path = ""  # imagefolder: the directory holding metadata.jsonl.
    c.data.tfds_name = "coco_captions"  # tfds: the prepared dataset's name.
    c.data.tfds_split = "train"  # tfds: the split to read.
    c.data.tfds_data_dir = ""  # "" = TFDS's default (~/tensorflow_datasets).
    c.data.tfds_image_key = "image"  # tfds: the image feature.
    c.data.tfds_caption_key = "captions/text"  # "/" reaches into nested features.
    # .txt / .jsonl corpus (file or directory) of text-only documents; set beside an image source,
    # they are mixed in at data.text_ratio.
    c.data.text_path = ""
    c.data.text_ratio = 1.0  # Text-only positions per image-caption position (the paper: 1:1).
    c.data.tokenizer = "bytes"  # "bytes", "words:W1,W2,..", "sentencepiece:PATH", "tiktoken:PATH"
    # "paper": warn at start where the data departs from the paper's recipe (no data.text_path
    # for the 1:1 text mix, the bytes tokenizer for a Llama-2 vocabulary); "" = no such warnings.
    c.data.recipe = ""
    c.data.image_size = 256  # Images are resized (short side) and centre-cropped to this.
    # What the model sees of an image: "pixels", or "vae" (the latents of image.vae_path,
    # normalised; encoded on the training devices, or read from a latent cache).
    c.data.latents = "pixels"
    c.data.max_caption_tokens = 128  # Captions are cut to this many tokens (and to fit a row).
    # Images with more pixels are skipped before decoding (a small PNG can decode to gigabytes).
    c.data.max_image_pixels = 64_000_000
    c.data.caption_first_prob = 0.8  # Caption-first (text->image) vs image-first (captioning).
    c.data.pack_window = 256  # Documents first-fit packed together (the resumable unit).
    c.data.num_threads = 4  # Threads decoding documents.
    c.data.prefetch = 64  # Documents decoded ahead.
    c.data.num_workers = 0  # >0: decode in that many worker processes (grain mp_prefetch).
    c.data.caption_len = 16  # synthetic: caption tokens per document.
    # Records held out of training for evaluation: a fixed hash of each record's name (an image's
    # file name, a text paragraph's file and number), the same on every machine.
    c.data.held_out_percent = 5.0

    c.eval = ml_collections.ConfigDict()
    c.eval.num_examples = 64  # Held-out examples per suite (prompts, images, text documents).
    c.eval.batch_size = 16  # Examples per batch of generation or scoring.
    c.eval.seed = 0  # Noise and sampling of every suite: evaluations of one run compare.
    c.eval.sampling_steps = 50  # Denoising steps of the generating suites.
    # Classifier-free guidance of the generating suites: the paper's ablation scale, 3 (5 in
    # its Chameleon comparison: CFG_SCALE_CHAMELEON_COMPARISON).
    c.eval.cfg_scale = CFG_SCALE_ABLATION
    # The diffusion suite's fixed grid of noise levels, as fractions of diffusion.num_timesteps.
    c.eval.diffusion_levels = (0.05, 0.25, 0.5, 0.75, 0.95)
    c.eval.text_path = ""  # text suite: a held-out .txt/.jsonl (default: data.text_path's split).
    c.eval.data_path = ""  # captions/images suites: an ImageFolder (default: the training data).
    c.eval.inception_weights = ""  # images suite: pytorch-fid's pt_inception-2015-12-05 file.
    c.eval.clip_weights = ""  # images suite: a Hugging Face CLIP directory.
    return c


_DTYPES = ("float32", "bfloat16", "float16")


def resolve_model(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Returns a copy of the config with the 0 = default fields filled in, after checking it."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    model, image, patch = cfg.model, cfg.image, cfg.patch  # the sections checked here
    model.num_kv_heads = model.num_kv_heads or model.num_heads
    model.head_dim = model.head_dim or model.d_model // model.num_heads
    model.ffn_dim = model.ffn_dim or llama_ffn_dim(model.d_model)
    _check(
        model.image_repr in IMAGE_REPRESENTATIONS,
        "model.image_repr",
        f"{model.image_repr!r} is not one of {IMAGE_REPRESENTATIONS}",
    )
    if model.image_repr == "discrete":
        _follow_the_tokenizer(cfg)
    else:
        image.codebook_size = 0
    if "data" in cfg and cfg.data.latents == "pixels":
        image.latent_size = image.latent_size or cfg.data.image_size
        image.latent_channels = image.latent_channels or 3
    elif "data" in cfg and cfg.data.latents == "vae":
        _follow_the_vae(cfg)
    elif "data" in cfg:
        _check(False, "data.latents", f"{cfg.data.latents!r} is not 'pixels' or 'vae'")
    _check(
        image.latent_size > 0 and image.latent_channels > 0,
        "image.latent_size",
        "0 (follow the data) works in pixel space only; give the VAE's latent size and channels",
    )
    _check(
        model.num_heads % model.num_kv_heads == 0,
        "model.num_kv_heads",
        f"{model.num_kv_heads} must divide model.num_heads={model.num_heads}",
    )
    _check(model.head_dim % 2 == 0, "model.head_dim", f"{model.head_dim} must be even for RoPE")
    for key in ("param_dtype", "dtype"):
        _check(model[key] in _DTYPES, f"model.{key}", f"{model[key]!r} is not one of {_DTYPES}")
    _check(
        model.attention in IMPLEMENTATIONS,
        "model.attention",
        f"{model.attention!r} is not one of {IMPLEMENTATIONS}",
    )
    _check(
        model.attention != "cudnn" or model.dtype in ("bfloat16", "float16"),
        "model.attention",
        "cudnn attention needs model.dtype bfloat16 or float16",
    )
    _check(
        model.image_attention in IMAGE_ATTENTION,
        "model.image_attention",
        f"{model.image_attention!r} is not one of {IMAGE_ATTENTION}",
    )
    k = image.patch_size
    _check(k in (1, 2, 4, 8), "image.patch_size", f"{k} is not one of 1, 2, 4, 8")
    _check(
        image.latent_size % k == 0,
        "image.latent_size",
        f"{image.latent_size} is not a multiple of image.patch_size={k}",
    )
    if image.max_images == 0:
        _check("data" in cfg, "image.max_images", "0 (derived) needs the data section's seq_len")
        image.max_images = derived_max_images(cfg.data, (image.latent_size // k) ** 2)
    _check(image.max_images >= 1, "image.max_images", "needs at least one image slot per row")
    _check(
        patch.kind in ("linear", "unet"), "patch.kind", f"{patch.kind!r} is not 'linear' or 'unet'"
    )
    if patch.kind == "unet":
        levels = int(math.log2(k)) + 1
        _check(
            len(patch.unet_channels) >= levels,
            "patch.unet_channels",
            f"patch_size={k} needs {levels} widths, got {tuple(patch.unet_channels)} (for a U-Net "
            f"of about the same size: config.matched_unet_channels; configs/paper.py takes the "
            f"patch size in its argument, e.g. paper:0.76b,unet,p{k})",
        )
    diffusion = cfg.diffusion
    _check(
        diffusion.objective in ("epsilon", "flow"),
        "diffusion.objective",
        f"{diffusion.objective!r} is not 'epsilon' or 'flow'",
    )
    _check(
        0 < diffusion.noise_limit <= diffusion.num_timesteps,
        "diffusion.noise_limit",
        f"{diffusion.noise_limit} must be in (0, num_timesteps={diffusion.num_timesteps}]",
    )
    _check(
        diffusion.timestep_sampling in TIMESTEP_SAMPLING,
        "diffusion.timestep_sampling",
        f"{diffusion.timestep_sampling!r} is not one of {', '.join(TIMESTEP_SAMPLING)}",
    )
    _check(
        0.0 <= diffusion.cond_drop_rate < 1.0,
        "diffusion.cond_drop_rate",
        f"{diffusion.cond_drop_rate} must be in [0, 1) (a share of captions dropped)",
    )
    if patch.kind == "unet":
        for level, width in enumerate(patch.unet_channels[:levels]):
            heads = unet_attention_heads(width, patch.unet_head_dim)
            attends = unet_attends(image.latent_size, level, patch.unet_attention_resolution)
            _check(
                not attends or width % heads == 0,
                "patch.unet_head_dim",
                f"{patch.unet_head_dim} splits the U-Net's width {width} into {heads} heads "
                f"unevenly; choose a head size whose multiple is {width}",
            )
    if "data" in cfg:
        _check_data(cfg.data, (image.latent_size // k) ** 2)
    if "train" in cfg:
        _check_training(cfg)
    return cfg


def unet_attends(latent_size: int, level: int, attention_resolution: int) -> bool:
    """Whether the U-Net attends at `level` (resolution latent_size / 2^level): at resolutions of
    at most `patch.unet_attention_resolution` pixels a side."""
    return latent_size // 2**level <= attention_resolution


def unet_attention_heads(width: int, head_dim: int) -> int:
    """Heads of the U-Net's attention over `width` channels (`patch.unet_head_dim` each)."""
    return max(1, width // head_dim)


def derived_max_images(data, num_patches: int) -> int:
    """image.max_images = 0: slots for as many image documents as a row of data.seq_len holds.

    The shortest image document is `BOS BOI patches EOI EOS` (its caption dropped for guidance),
    num_patches + 4 positions, so no row holds more than seq_len // (num_patches + 4) images, and
    with that many slots first-fit packing closes a row only when its positions run out, at every
    patch size. A fixed count does not scale with the patches: 8 slots of 4x4-patch images (64
    positions each) fill 544 of 4096 positions, and without text to fill the rest the row is
    mostly padding. The price of static shapes: every slot runs through the patch layers (and
    through the VAE where it encodes pixels on the devices), used or not. A text-only source has
    no images: 1 slot."""
    if data.source == "text":
        return 1
    return max(1, data.seq_len // (num_patches + 4))


def unet_parameter_count(
    widths,
    *,
    blocks: int,
    latent_size: int,
    latent_channels: int,
    attention_resolution: int,
    time_embed_dim: int,
    d_model: int,
) -> int:
    """Parameters of `unet.UNetPatching` with these level widths, from its layer shapes (nothing
    is built; tests/test_ablation_configs.py checks it against the module under eval_shape)."""
    temb = 4 * widths[0]
    n = time_embed_dim * temb + temb + temb * temb + temb  # the timestep MLP
    n += 9 * latent_channels * widths[0] + widths[0]  # conv_in

    def res_block(c_in, c_out):  # norm1, conv1, time, norm2, conv2 and a 1x1 skip conv
        skip = c_in * c_out + c_out if c_in != c_out else 0
        return 2 * c_in + 9 * c_in * c_out + (temb + 5) * c_out + 9 * c_out**2 + skip

    def attention(c, level):  # norm, qkv, out
        return 4 * c * c + 6 * c if unet_attends(latent_size, level, attention_resolution) else 0

    c, skips = widths[0], []
    for level, width in enumerate(widths):
        for _ in range(blocks):
            n += res_block(c, width) + attention(width, level)
            c = width
            skips.append(c)
        if level < len(widths) - 1:
            n += 9 * c * c + c  # downsample
    n += 2 * c * d_model + d_model + c  # to_tokens, from_tokens
    for level in reversed(range(len(widths))):
        for _ in range(blocks):
            n += res_block(c + skips.pop(), widths[level]) + attention(widths[level], level)
            c = widths[level]
        if level > 0:
            n += 9 * c * c + c  # upsample
    return n + 2 * c + 9 * c * latent_channels + latent_channels  # norm_out, conv_out


def matched_unet_channels(
    cfg: ml_collections.ConfigDict,
    patch_size: int,
    reference_patch_size: int = 2,
    multiple: int = 0,
) -> tuple[int, ...]:
    """U-Net widths for `patch_size` with about the parameters the config's U-Net has at
    `reference_patch_size`, so that a patch-size ablation (the paper's Table 6, a ~0.27B U-Net at
    every patch size) compares U-Nets of one size.

    The U-Net has log2(patch_size) + 1 levels, the first of `patch.unet_channels`, so the levels a
    larger patch adds add parameters. This keeps the shape of those widths and scales them all by
    the one factor that gives the reference's `unet_parameter_count` (the config's blocks, latent
    and model width), then rounds each to a multiple of `multiple` (default `patch.unet_head_dim`,
    so attention heads divide evenly): of the roundings within 1% of the reference's count (else
    the nearest), the closest to the scaled widths. At `reference_patch_size` it is the reference
    widths themselves. The config's latent must be known (pixel space follows data.image_size).
    At the tiny scale widths are a few multiples of the head size: give `multiple=8`."""
    patch, image = cfg.patch, cfg.image
    pixels = cfg.data.latents == "pixels"
    size = image.latent_size or (cfg.data.image_size if pixels else 0)
    channels = image.latent_channels or (3 if pixels else 0)
    _check(size > 0 and channels > 0, "image.latent_size", "give the VAE's latent size, channels")
    for k in (patch_size, reference_patch_size):
        _check(k in (1, 2, 4, 8), "image.patch_size", f"{k} is not one of 1, 2, 4, 8")
    reference, levels = tuple(patch.unet_channels), int(math.log2(patch_size)) + 1
    reference_levels = int(math.log2(reference_patch_size)) + 1
    _check(
        len(reference) >= reference_levels,
        "patch.unet_channels",
        f"patch_size={reference_patch_size} needs {reference_levels} widths, got {reference}",
    )
    if patch_size == reference_patch_size:
        return reference[:levels]
    shape = (reference + reference[-1:] * levels)[:levels]  # too few widths: repeat the last
    multiple = multiple or patch.unet_head_dim

    def count(widths):
        return unet_parameter_count(
            widths,
            blocks=patch.unet_blocks,
            latent_size=size,
            latent_channels=channels,
            attention_resolution=patch.unet_attention_resolution,
            time_embed_dim=patch.time_embed_dim,
            d_model=cfg.model.d_model,
        )

    def allowed(widths):  # attention heads divide the width; no width falls where shape rises
        heads = all(
            not unet_attends(size, level, patch.unet_attention_resolution)
            or width % unet_attention_heads(width, patch.unet_head_dim) == 0
            for level, width in enumerate(widths)
        )
        return heads and all(
            widths[i] <= widths[i + 1] for i in range(levels - 1) if shape[i] <= shape[i + 1]
        )

    # The scale at which the unrounded widths have the reference's count (it grows with scale).
    target, low, high = count(reference[:reference_levels]), 1 / 64, 64.0
    for _ in range(60):
        scale = math.sqrt(low * high)
        low, high = (scale, high) if count([scale * w for w in shape]) < target else (low, scale)
    ideal = [scale * w for w in shape]
    # Each width rounded to one of the 4 multiples around it; of those allowed and within 1% of
    # the target (else the nearest count), the nearest to the ideal widths.
    near = [[multiple * (math.floor(w / multiple) + j) for j in (-1, 0, 1, 2)] for w in ideal]
    candidates = [
        widths for widths in itertools.product(*near) if min(widths) >= multiple and allowed(widths)
    ]
    _check(bool(candidates), "patch.unet_head_dim", f"no widths in multiples of {multiple} fit")
    errors = {widths: abs(count(widths) / target - 1) for widths in candidates}
    tolerance = max(0.01, min(errors.values()))

    def distance(widths):
        return sum(abs(math.log(w / x)) for w, x in zip(widths, ideal, strict=True))

    return min((w for w in candidates if errors[w] <= tolerance), key=distance)


def data_recipe_warnings(cfg: ml_collections.ConfigDict) -> list[str]:
    """Where a data.recipe = "paper" run departs from the paper's data in what the user must
    supply (a text corpus, the Llama-2 tokenizer): one line each, which the trainer prints at
    start. The synthetic benchmark source reads no data: none."""
    data = cfg.data
    if data.get("recipe", "") != "paper" or data.source == "synthetic":
        return []
    warnings = []
    if data.source != "text" and not data.text_path:
        warnings.append(
            "data.text_path is not set: the paper mixes text-only documents 1:1 "
            "(data.text_ratio) with the image-caption ones, and this run sees image-caption "
            "documents only; give a corpus with --config.data.text_path=PATH (.txt / .jsonl)"
        )
    if data.tokenizer == "bytes" and cfg.model.vocab_size >= 32_000:  # not a byte-sized vocabulary
        warnings.append(
            f"data.tokenizer is 'bytes' against model.vocab_size={cfg.model.vocab_size}, the "
            f"size of the paper's Llama-2 SentencePiece tokenizer; give it with "
            f"--config.data.tokenizer=sentencepiece:PATH/tokenizer.model"
        )
    return warnings


def _check_data(data, num_patches: int) -> None:
    """The data section: shares in range, and a row long enough for the longest image document."""
    if "held_out_percent" in data:
        share = data.held_out_percent
        _check(0.0 <= share < 100.0, "data.held_out_percent", f"{share} must be in [0, 100)")
    _check(
        0.0 <= data.caption_first_prob <= 1.0,
        "data.caption_first_prob",
        f"{data.caption_first_prob} must be in [0, 1] (the share of text -> image documents)",
    )
    _check(data.text_ratio >= 0.0, "data.text_ratio", f"{data.text_ratio} must be at least 0")
    _check(
        data.max_caption_tokens >= 1,
        "data.max_caption_tokens",
        f"{data.max_caption_tokens} leaves no caption; give at least 1",
    )
    _check(data.pack_window >= 1, "data.pack_window", f"{data.pack_window} must be at least 1")
    if data.source != "text":  # BOS caption BOI image EOI EOS: at least one caption token
        shortest = num_patches + 5
        _check(
            data.seq_len >= shortest,
            "data.seq_len",
            f"{data.seq_len} cannot hold one image document ({num_patches} patches, 4 markers and "
            f"a caption: at least {shortest} positions); raise it, or lower the patches per "
            f"image (image.patch_size up, or data.image_size down)",
        )


def _check_training(cfg) -> None:
    """The train and optimizer sections: counts and rates a run can use."""
    train = cfg.train
    _check(
        train.nan_policy in ("stop", "skip"),
        "train.nan_policy",
        f"{train.nan_policy!r} is not 'stop' or 'skip'",
    )
    for key in ("num_steps", "batch_size", "grad_accum_steps", "log_every", "checkpoint_every"):
        _check(train[key] >= 1, f"train.{key}", f"{train[key]} must be at least 1")
    _check(train.keep_checkpoints >= 1, "train.keep_checkpoints", "keep at least 1 checkpoint")
    _check(train.eval_every >= 0, "train.eval_every", f"{train.eval_every} must be at least 0")
    _check(
        train.batch_size % train.grad_accum_steps == 0,
        "train.batch_size",
        f"{train.batch_size} is not divisible by train.grad_accum_steps={train.grad_accum_steps}",
    )
    _check(
        train.max_nonfinite_streak >= 1,
        "train.max_nonfinite_streak",
        f"{train.max_nonfinite_streak} must be at least 1",
    )
    _check(0.0 <= train.ema_decay < 1.0, "train.ema_decay", f"{train.ema_decay} must be in [0, 1)")
    if "optimizer" not in cfg:
        return
    opt = cfg.optimizer
    _check(opt.peak_lr > 0, "optimizer.peak_lr", f"{opt.peak_lr} must be above 0")
    _check(
        0 <= opt.min_lr <= opt.peak_lr,
        "optimizer.min_lr",
        f"{opt.min_lr} must be in [0, optimizer.peak_lr={opt.peak_lr}]",
    )
    _check(opt.warmup_steps >= 0, "optimizer.warmup_steps", f"{opt.warmup_steps} is negative")
    for key in ("b1", "b2"):
        _check(0.0 <= opt[key] < 1.0, f"optimizer.{key}", f"{opt[key]} must be in [0, 1)")
    for key in ("weight_decay", "clip_norm"):
        _check(opt[key] >= 0, f"optimizer.{key}", f"{opt[key]} must be at least 0")


def _follow_the_tokenizer(cfg) -> None:
    """A discrete run: images arrive as pixels, the VQ tokenizer at image.vae_path turns each
    patch_size x patch_size window into one code id on the devices (so patch_size is the
    tokenizer's downsampling), and image.codebook_size comes from it too."""
    image = cfg.image
    if "data" in cfg:
        _check(
            cfg.data.latents == "pixels",
            "data.latents",
            f"{cfg.data.latents!r}: discrete images arrive as pixels that the VQ tokenizer "
            "encodes in the step; set data.latents=pixels",
        )
    if not image.vae_path:  # shape-only uses (parameter counts, memory proofs) need no tokenizer
        _check(
            image.codebook_size >= 2,
            "image.vae_path",
            "model.image_repr='discrete' needs the VQ tokenizer, a workdir of python -m "
            "transfusion_jax.train_vae --config vq_tiny (or image.codebook_size for shapes only)",
        )
        return
    from transfusion_jax.vae.latent_space import vq_space

    downsample, codebook_size = vq_space(image.vae_path)
    _check(
        image.codebook_size in (0, codebook_size),
        "image.codebook_size",
        f"{image.codebook_size} disagrees with the tokenizer at {image.vae_path} "
        f"({codebook_size}); set it to 0 to follow the tokenizer",
    )
    image.codebook_size = codebook_size
    _check(
        image.patch_size == downsample,
        "image.patch_size",
        f"{image.patch_size}: one code id stands for a {downsample}x{downsample} window of the "
        f"tokenizer at {image.vae_path}; set image.patch_size={downsample}",
    )


def _follow_the_vae(cfg) -> None:
    """Fills image.latent_size / latent_channels from the VAE (reading its JSON files only);
    values that were given must agree with it."""
    from transfusion_jax.vae.latent_space import latent_space

    image = cfg.image
    if not image.vae_path:  # shape-only uses (parameter counts, memory proofs) need no VAE
        _check(
            image.latent_size > 0 and image.latent_channels > 0,
            "image.vae_path",
            "data.latents='vae' needs the VAE, a diffusers AutoencoderKL directory or a workdir "
            "of python -m transfusion_jax.train_vae",
        )
        return
    space = latent_space(image.vae_path)
    size = space.latent_size(cfg.data.image_size)
    for key, value in (("latent_size", size), ("latent_channels", space.channels)):
        _check(
            image[key] in (0, value),
            f"image.{key}",
            f"{image[key]} disagrees with the VAE at {image.vae_path} ({value} for "
            f"data.image_size={cfg.data.image_size}); set it to 0 to follow the VAE",
        )
        image[key] = value


def images_arrive_as_pixels(cfg) -> bool:
    """True when batches carry images as pixels that the train step encodes with the VAE (a
    latent cache carries latents already, and so does the synthetic benchmark source)."""
    return cfg.data.latents == "vae" and cfg.data.source not in ("cached", "synthetic")


def carried_image_shape(cfg) -> tuple[int, int, int]:
    """[h, w, c] of an image slot of a batch (`Batch.latents`): the latent, or the image in
    pixels when the train step encodes it (`images_arrive_as_pixels`). Either way an image takes
    (latent_size / patch_size)^2 positions of a row."""
    if images_arrive_as_pixels(cfg):
        return (cfg.data.image_size, cfg.data.image_size, 3)
    return (cfg.image.latent_size, cfg.image.latent_size, cfg.image.latent_channels)


def shipped_configs() -> list[str]:
    return sorted(
        p.name.removesuffix(".py")
        for p in importlib.resources.files("transfusion_jax.configs").iterdir()
        if p.name.endswith(".py") and not p.name.startswith("_")
    )


def config_path(name_or_path: str) -> pathlib.Path:
    """A config file: a path, or the name of a config shipped with the package ("tiny",
    "paper"); "configs/tiny.py" given from outside the repository also finds the shipped one."""
    path = pathlib.Path(name_or_path)
    if path.is_file():
        return path
    if path.parent in (pathlib.Path("."), pathlib.Path("configs")):  # a typo elsewhere must fail
        shipped = importlib.resources.files("transfusion_jax.configs") / f"{path.stem}.py"
        if shipped.is_file() and path.stem in shipped_configs():
            return pathlib.Path(str(shipped))
    raise FileNotFoundError(
        f"--config {name_or_path}: no such file, and not a shipped config "
        f"(one of {', '.join(shipped_configs())}, e.g. --config tiny or --config paper:0.76b)"
    )


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads "paper:0.76b,unet" or "configs/paper.py:0.76b,unet" as get_config("0.76b,unet") of
    that file."""
    path, _, arg = spec.partition(":")
    path = config_path(path)
    module_spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def expand_config_flag(argv: list[str]) -> list[str]:
    """argv with `--config NAME[:ARG]` made a file path, for ml_collections' config flag (which
    takes paths only)."""
    out = list(argv)
    for i, arg in enumerate(out):  # every occurrence: absl takes the last
        if arg == "--config" and i + 1 < len(out):
            value, prefix, index = out[i + 1], "", i + 1
        elif arg.startswith("--config="):
            value, prefix, index = arg.removeprefix("--config="), "--config=", i
        else:
            continue
        path, colon, rest = value.partition(":")
        out[index] = prefix + str(config_path(path)) + colon + rest
    return out


def _check(ok: bool, field: str, why: str) -> None:
    if not ok:
        raise ValueError(f"config field {field}: {why}")


def key_meanings(vae: bool = False) -> dict:
    """key -> meaning, from the comments on (or just above) each line of the functions that
    define the keys: base_config, and with `vae` (a VAE training config) also vae_base_config and
    vae_config (whose keys are the `vae` section). A line without a comment keeps the earlier
    meaning."""
    from transfusion_jax.vae.autoencoder import vae_config
    from transfusion_jax.vae.config import vae_base_config

    sources = [(base_config, None)]
    if vae:
        sources += [(vae_base_config, None), (vae_config, "vae")]
    meanings = {}
    for function, section in sources:
        pending = []
        for line in inspect.getsource(function).splitlines():
            stripped = line.strip()
            if stripped.startswith("#"):
                pending.append(stripped.lstrip("# "))
                continue
            pattern = r"c\.(\w+) = " if section else r"c\.(\w+)\.(\w+) = "
            match = re.match(pattern + r"[^#]*?(?:#\s*(.*))?$", stripped)
            if match and not match.group(0).endswith("ConfigDict()"):
                *names, comment = match.groups()
                key = ".".join([section, *names] if section else names)
                meaning = " ".join([*pending, comment or ""]).strip()
                if meaning or key not in meanings:
                    meanings[key] = meaning
            pending = [] if stripped else pending
    return meanings


def describe(cfg: ml_collections.ConfigDict) -> str:
    """One line per key: `section.key = value  # meaning`."""
    meanings = key_meanings(vae="vae" in cfg)
    lines = []
    for section, values in cfg.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            lines.append(f"{name} = {value!r}  # {meanings.get(name, '')}".rstrip(" #"))
    return "\n".join(lines)
