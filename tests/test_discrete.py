"""Discrete image tokens (the Chameleon baseline): the codes written into the row against a
numpy layout, the loss against a cross-entropy recomputed over every target, causal attention
inside images, the config rules, the train step's tokenizer, and FLOPs against a hand count."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import tiny_config
from transfusion_jax.batch import (
    SpecialTokens,
    build_batch,
    caption_first_document,
    image_first_document,
)
from transfusion_jax.discrete import discrete_counts, discrete_loss, with_image_tokens
from transfusion_jax.flops import model_flops_per_token
from transfusion_jax.model import Transfusion, parameter_counts
from transfusion_jax.model_config import ModelSpec
from transfusion_jax.sharding import make_mesh
from transfusion_jax.train import train
from transfusion_jax.train_step import TrainProgram

SPECIAL = SpecialTokens()
TEXT_VOCAB = 384  # configs/tiny.py: bytes
CODES = 32


def discrete_config(**overrides):
    """tiny_config as a discrete run on 16 px pixel images in 2x2 windows (8x8 = 64 codes), with
    the codebook given (no tokenizer: shape-only)."""
    cfg = tiny_config(**overrides)
    cfg.model.image_repr = "discrete"
    cfg.image.update(latent_size=16, latent_channels=3, codebook_size=CODES)
    cfg.data.image_size = 16
    return cfg


def hand_batch(rng, cfg, rows=2):
    """Two rows of caption-first and image-first documents with random pixels."""
    shape = (16, 16, 3)
    docs = []
    for _ in range(rows):
        picture = lambda: rng.uniform(-1, 1, shape).astype(np.float32)
        docs.append(
            [
                caption_first_document([40, 41, 42], picture(), SPECIAL),
                image_first_document(picture(), [50, 51], SPECIAL),
            ]
        )
    im = cfg.image
    return build_batch(docs, cfg.data.seq_len, im.max_images, shape, im.patch_size, SPECIAL)


def test_codes_are_written_at_the_image_positions_in_raster_order():
    cfg = discrete_config()
    batch = hand_batch(np.random.default_rng(0), cfg)
    m = cfg.image.max_images
    codes = np.random.default_rng(1).integers(0, CODES, (2, m, 64))
    out = with_image_tokens(batch, jnp.asarray(codes), TEXT_VOCAB)
    tokens, image_ids = np.asarray(batch.tokens), np.asarray(batch.image_ids)
    expected = tokens.copy()
    for b in range(2):
        for slot in range(m):
            where = np.flatnonzero(image_ids[b] == slot)
            expected[b, where] = TEXT_VOCAB + codes[b, slot, : len(where)]
            assert len(where) in (0, 64)
    np.testing.assert_array_equal(out.tokens, expected)
    assert (np.asarray(out.image_ids) == -1).all()
    # the text, segments and positions are the row's own
    np.testing.assert_array_equal(out.segment_ids, batch.segment_ids)
    np.testing.assert_array_equal(out.positions, batch.positions)


def test_the_loss_is_the_lm_loss_over_every_target_text_and_image_alike():
    cfg = discrete_config()
    model = Transfusion(cfg, nnx.Rngs(0))
    batch = hand_batch(np.random.default_rng(0), cfg)
    codes = jnp.asarray(np.random.default_rng(1).integers(0, CODES, (2, cfg.image.max_images, 64)))
    tokens_batch = with_image_tokens(batch, codes, TEXT_VOCAB)
    loss, metrics = discrete_loss(model, tokens_batch, TEXT_VOCAB)

    logits = np.asarray(model(tokens_batch, None, None)[0], np.float64)
    tokens, segments = np.asarray(tokens_batch.tokens), np.asarray(tokens_batch.segment_ids)
    ces, image_ces, text_ces, after_ces = [], [], [], []
    for b in range(tokens.shape[0]):
        seen_image = False
        for q in range(tokens.shape[1] - 1):
            if q == 0 or segments[b, q] != segments[b, q - 1]:
                seen_image = False  # a new document
            seen_image |= bool(tokens[b, q] >= TEXT_VOCAB)
            if segments[b, q] > 0 and segments[b, q + 1] == segments[b, q]:  # same document
                row = logits[b, q]
                ce = np.log(np.exp(row - row.max()).sum()) + row.max() - row[tokens[b, q + 1]]
                ces.append(ce)
                if tokens[b, q + 1] >= TEXT_VOCAB:
                    image_ces.append(ce)
                elif tokens[b, q] < TEXT_VOCAB:  # text: neither input nor target is a code
                    text_ces.append(ce)
                    if seen_image:
                        after_ces.append(ce)
    assert len(image_ces) == 4 * 64  # every code is a target, the first one after BOI
    # the last code -> EOI targets (4 images) count in the loss, in neither split
    assert len(ces) == len(image_ces) + len(text_ces) + 4
    # per row: EOI -> caption (2 tokens) -> EOS in the image-first document, EOI -> EOS in the
    # caption-first one
    assert len(after_ces) == 2 * 4
    np.testing.assert_allclose(loss, np.mean(ces), rtol=1e-5)
    np.testing.assert_allclose(metrics["image_token_loss"], np.mean(image_ces), rtol=1e-5)
    np.testing.assert_allclose(metrics["text_token_loss"], np.mean(text_ces), rtol=1e-5)
    np.testing.assert_allclose(metrics["lm_loss_after_image"], np.mean(after_ces), rtol=1e-5)
    assert int(metrics["num_image_targets"]) == len(image_ces)
    assert int(metrics["num_text_targets"]) == len(text_ces)
    # micro-batch form: the whole batch's counts as denominators give the same loss
    counts = discrete_counts(tokens_batch, TEXT_VOCAB)
    again, again_metrics = discrete_loss(model, tokens_batch, TEXT_VOCAB, counts)
    np.testing.assert_allclose(again, loss, rtol=1e-6)
    for key in ("image_token_loss", "text_token_loss", "lm_loss_after_image"):
        np.testing.assert_allclose(again_metrics[key], metrics[key], rtol=1e-6)


def test_attention_is_causal_inside_images():
    """Changing the last code of an image changes no earlier position's logits."""
    cfg = discrete_config()
    model = Transfusion(cfg, nnx.Rngs(0))
    batch = hand_batch(np.random.default_rng(0), cfg, rows=1)
    codes = np.random.default_rng(1).integers(0, CODES, (1, cfg.image.max_images, 64))
    first = with_image_tokens(batch, jnp.asarray(codes), TEXT_VOCAB)
    codes[0, 0, 63] = (codes[0, 0, 63] + 1) % CODES
    second = with_image_tokens(batch, jnp.asarray(codes), TEXT_VOCAB)
    last = int(np.flatnonzero(np.asarray(batch.image_ids)[0] == 0)[-1])
    a, b = (np.asarray(model(x, None, None)[0]) for x in (first, second))
    np.testing.assert_array_equal(a[0, :last], b[0, :last])
    assert np.abs(a[0, last:] - b[0, last:]).max() > 0  # and the changed position does matter


def test_the_spec_adds_the_codebook_to_the_vocabulary_and_drops_the_patch_layers():
    spec = ModelSpec.from_config(discrete_config())
    assert spec.transformer.vocab_size == TEXT_VOCAB + CODES
    assert spec.image_token_offset == TEXT_VOCAB
    assert not spec.transformer.bidirectional_images
    counts = parameter_counts(spec)
    assert counts["patch"] == 0
    continuous = ModelSpec.from_config(tiny_config())
    assert continuous.transformer.vocab_size == TEXT_VOCAB and continuous.image.codebook_size == 0


@pytest.mark.parametrize("kind", ["continuous", "discrete"])
def test_flops_per_token_equal_a_hand_count(kind):
    cfg = discrete_config() if kind == "discrete" else tiny_config()
    d, depth, seq = cfg.model.d_model, cfg.model.depth, cfg.data.seq_len
    ffn = ModelSpec.from_config(cfg).transformer.ffn_dim
    # per layer: q, k, v, o (d x d each, full heads), SwiGLU (3 d x ffn), two RMSNorm scales
    transformer = depth * (4 * d * d + 3 * d * ffn + 2 * d) + d  # + the final norm
    vocab = TEXT_VOCAB + (CODES if kind == "discrete" else 0)
    weights = transformer + d * vocab  # the LM head's matmul, per token
    if kind == "continuous":  # linear patch layers run once per position too
        weights += parameter_counts(cfg)["patch"]
    counts = parameter_counts(cfg)
    assert counts["transformer"] == transformer
    expected = 6 * weights + 12 * depth * d * seq
    assert model_flops_per_token(cfg, seq, counts) == expected


def test_discrete_configs_are_checked_naming_the_field():
    cfg = discrete_config()
    cfg.data.latents = "vae"
    with pytest.raises(ValueError, match="data.latents"):
        ModelSpec.from_config(cfg)
    cfg = discrete_config()
    cfg.image.codebook_size = 0
    with pytest.raises(ValueError, match="image.vae_path"):
        ModelSpec.from_config(cfg)
    cfg = discrete_config()
    cfg.model.image_repr = "tokens"
    with pytest.raises(ValueError, match="model.image_repr"):
        ModelSpec.from_config(cfg)


# -- with a trained tokenizer -----------------------------------------------------------------


@pytest.fixture
def tokenizer(tiny_tokenizer):
    """conftest's session tokenizer: 8x8 codes of CODES (32) for a 16 px image."""
    return tiny_tokenizer


def test_the_tokenizer_decides_the_codebook_and_the_window(tokenizer):
    from transfusion_jax.train import TransfusionTask

    cfg = discrete_config()
    cfg.image.update(vae_path=str(tokenizer), codebook_size=0)
    assert ModelSpec.from_config(cfg).image.codebook_size == CODES
    # the trainer pins the tokenizer's checkpoint, and refuses a run without a tokenizer
    assert TransfusionTask.resolve(cfg).image.vae_step == 6  # its last checkpoint
    shapes_only = discrete_config()
    with pytest.raises(ValueError, match="image.vae_path: a discrete run trains on"):
        TransfusionTask.resolve(shapes_only)
    cfg.image.patch_size = 4
    with pytest.raises(ValueError, match="image.patch_size=2"):
        ModelSpec.from_config(cfg)
    kl = discrete_config()
    kl.model.image_repr = "continuous"
    kl.data.latents = "vae"
    kl.image.update(vae_path=str(tokenizer), latent_size=0, latent_channels=0)
    with pytest.raises(ValueError, match="VQ tokenizer"):
        ModelSpec.from_config(kl)


def test_the_train_step_tokenizes_each_image_as_the_tokenizer_does(tokenizer):
    from transfusion_jax.vae import load_vq

    cfg = discrete_config()
    cfg.image.update(vae_path=str(tokenizer), codebook_size=0)
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
    program = TrainProgram(cfg, make_mesh(1, 1, 1, jax.devices()[:1]))
    batch = hand_batch(np.random.default_rng(0), cfg)
    converted = jax.jit(program.tokenize_images)(program.frozen, batch)
    pixels = np.asarray(batch.latents).reshape(-1, 16, 16, 3)
    ids = np.asarray(load_vq(tokenizer).encode_ids(pixels))
    ids = ids.reshape(2, cfg.image.max_images, 64)
    expected = with_image_tokens(batch, jnp.asarray(ids), TEXT_VOCAB)
    np.testing.assert_array_equal(converted.tokens, expected.tokens)
    assert (np.asarray(converted.tokens)[np.asarray(batch.image_ids) >= 0] >= TEXT_VOCAB).all()


def test_a_discrete_run_trains_and_logs_its_split_losses(tokenizer, tmp_path, capsys):
    cfg = discrete_config()
    cfg.image.update(vae_path=str(tokenizer), codebook_size=0, max_images=0)
    cfg.data.update(source="shapes", seq_len=256)
    cfg.train.update(num_steps=30, log_every=10, checkpoint_every=30, eval_every=0)
    cfg.optimizer.update(peak_lr=3e-3, warmup_steps=5)
    train(cfg, tmp_path / "run", devices=jax.devices()[:2])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert {"image_token_loss", "text_token_loss", "lm_loss_after_image"} <= records[0].keys()
    assert "diffusion_loss" not in records[0]
    assert records[-1]["loss"] < records[0]["loss"]
    # the step's FLOPs are the transformer's on a row, text or image alike
    flops = model_flops_per_token(cfg, 256, parameter_counts(cfg))
    assert records[-1]["train_flops"] == pytest.approx(30 * cfg.train.batch_size * 256 * flops)
    # the sample command draws (decoded by the tokenizer) and captions
    from transfusion_jax import sample as sample_cli

    run, out = str(tmp_path / "run"), tmp_path / "samples"
    common = ["--workdir", run, "--out", str(out)]
    sample_cli.main([*common, "--prompt", "a red circle", "--num", "2", "--image_top_k", "8"])
    from PIL import Image

    drawn = Image.open(out / "000.png")
    assert drawn.size == (16, 16) and (out / "grid.png").is_file()
    capsys.readouterr()
    sample_cli.main([*common, "--image", str(out / "000.png"), "--max_new_tokens", "8"])
    assert len(capsys.readouterr().out.splitlines()) == 1  # the caption (which may be empty)


# -- generation -------------------------------------------------------------------------------


def reference_codes(model, prefix, uncond_prefix, scale, n=64):
    """Greedy image codes without a cache: the whole row through the training forward pass for
    every code, guided as uncond + scale * (cond - uncond) over the codebook's logits."""
    forward = jax.jit(lambda batch: model(batch, None, None)[0])
    cfg = discrete_config()
    rows = {"cond": list(prefix), "uncond": list(uncond_prefix)}
    codes = []

    def code_logits(tokens):
        batch = build_batch([[[tokens]]], cfg.data.seq_len, 1, (16, 16, 3), 2, SPECIAL)
        logits = np.asarray(forward(batch))[0, len(tokens) - 1]
        return logits[TEXT_VOCAB : TEXT_VOCAB + CODES].astype(np.float64)

    for _ in range(n):
        cond = code_logits(rows["cond"])
        guided = cond
        if scale != 1:
            free = code_logits(rows["uncond"])
            guided = free + scale * (cond - free)
        code = int(np.argmax(guided))
        codes.append(code)
        for row in rows.values():
            row.append(TEXT_VOCAB + code)
    return np.asarray(codes)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_cached_guided_image_tokens_equal_an_uncached_recomputation(scale):
    from transfusion_jax.discrete_generator import DiscreteGenerator
    from transfusion_jax.generator import SamplingOptions

    model = Transfusion(discrete_config(), nnx.Rngs(3))
    generator = DiscreteGenerator(model, SPECIAL, 8, TEXT_VOCAB, CODES, num_ids=TEXT_VOCAB)
    prompts = [[SPECIAL.bos, 40, 41, 42], [SPECIAL.bos, 60, 61, 62, 63, 64, 65]]  # ragged rows
    options = SamplingOptions(max_new_tokens=1, cfg_scale=scale, image_temperature=0.0)
    result = generator.generate(prompts, jax.random.key(0), options, force_image=True)
    for prompt, images, tokens in zip(prompts, result.images, result.tokens, strict=True):
        (grid,) = images
        assert grid.shape == (8, 8)
        uncond = [SPECIAL.bos, SPECIAL.boi]
        expected = reference_codes(model, prompt + [SPECIAL.boi], uncond, scale)
        assert len(set(expected.tolist())) > 4  # a varied draw, not one code repeated
        np.testing.assert_array_equal(grid.reshape(-1), expected)
        # the image is returned as its grid; the row's tokens mark where it sits
        assert tokens[:2] == [SPECIAL.boi, SPECIAL.eoi]


def test_rows_not_drawing_an_image_keep_their_context():
    from transfusion_jax.discrete_generator import DiscreteGenerator
    from transfusion_jax.generator import SamplingOptions

    model = Transfusion(discrete_config(), nnx.Rngs(3))
    generator = DiscreteGenerator(model, SPECIAL, 8, TEXT_VOCAB, CODES, num_ids=TEXT_VOCAB)
    ctx = generator.start([[SPECIAL.bos, 40, SPECIAL.boi], [SPECIAL.bos, 50, 51]], 128)
    before = jax.device_get(ctx)
    options = SamplingOptions(cfg_scale=3.0, image_temperature=1.0)
    after, grids = generator.generate_image(ctx, jax.random.key(0), options, np.array([1, 0], bool))
    after = jax.device_get(after)
    assert list(after.length) == [before.length[0] + 64 + 1, before.length[1]]  # codes, EOI
    np.testing.assert_array_equal(after.logits[1], before.logits[1])
    live = before.length[1]  # the second row's committed cache is untouched
    np.testing.assert_array_equal(after.k[:, 1, :live], before.k[:, 1, :live])
    assert grids.shape == (2, 8, 8)


def test_a_given_image_enters_as_boi_codes_eoi_and_text_never_samples_codes():
    from transfusion_jax.discrete_generator import DiscreteGenerator
    from transfusion_jax.generator import SamplingOptions

    model = Transfusion(discrete_config(), nnx.Rngs(3))
    generator = DiscreteGenerator(model, SPECIAL, 8, TEXT_VOCAB, CODES, num_ids=TEXT_VOCAB)
    codes = np.random.default_rng(0).integers(0, CODES, (2, 8, 8))
    options = SamplingOptions(max_new_tokens=6, max_images=0, temperature=1.0)
    result = generator.generate([[SPECIAL.bos]] * 2, jax.random.key(1), options, images=codes)
    for row in result.tokens:
        assert all(t < TEXT_VOCAB for t in row)
    # the same continuation as a context built from the tokens themselves
    tokens = [[SPECIAL.bos, SPECIAL.boi, *(TEXT_VOCAB + c).tolist(), SPECIAL.eoi] for c in
              codes.reshape(2, -1)]  # fmt: skip
    again = generator.generate(tokens, jax.random.key(1), options)
    assert again.tokens == result.tokens
    with pytest.raises(ValueError, match="codes must be in"):
        generator.generate([[SPECIAL.bos]], jax.random.key(1), options, images=codes[:1] + CODES)


def test_caption_scores_of_a_discrete_run_read_its_image(tokenizer):
    """experiments/class_captions.py's row scores on a discrete run: the captions' log-likelihood
    after the image's code tokens, recomputed here from the model's logits."""
    from experiments.class_captions import row_log_likelihoods
    from transfusion_jax.evaluation.evaluator import Evaluator

    cfg = discrete_config()
    cfg.image.update(vae_path=str(tokenizer), codebook_size=0)
    model = Transfusion(cfg, nnx.Rngs(5))
    ev = Evaluator(cfg, model)
    rng = np.random.default_rng(0)
    pictures = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    rows = [[image_first_document(p, [40, 41, 42], SPECIAL)] for p in pictures]
    batch, _, _ = next(ev.batches(rows, []))
    scores = row_log_likelihoods(ev)(batch)[:2]
    converted = ev.images_as_tokens(batch)
    tokens = np.asarray(converted.tokens)
    logits = np.asarray(model(jax.tree.map(jnp.asarray, converted), None, None)[0], np.float64)
    expected = []
    for b in range(2):
        eoi = int(np.flatnonzero(tokens[b] == SPECIAL.eoi)[0])
        total = 0.0
        for q in range(eoi, eoi + 4):  # EOI -> 40, 40 -> 41, 41 -> 42, 42 -> EOS
            row = logits[b, q]
            total += row[tokens[b, q + 1]] - row.max() - np.log(np.exp(row - row.max()).sum())
        expected.append(total)
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert (tokens[0] >= TEXT_VOCAB).sum() == 64  # the image is in the row as its codes
    assert scores[0] != scores[1]  # and the two pictures score the same caption differently
