"""The VQ tokenizer of the Chameleon baseline: the codebook lookup, its gradients and losses
against closed forms and brute force, the moving-average codebook against a numpy recomputation,
and a tiny tokenizer trained by the shared VAE trainer (overfitting a batch; a run read back by
load_vq)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import ROOT
from tests.test_vae_training import ONE_DEVICE, SIZE, smooth_images, vae_test_config
from transfusion_jax.config import load_config
from transfusion_jax.sharding import make_mesh
from transfusion_jax.vae import load_vae, load_vq
from transfusion_jax.vae.autoencoder import AutoencoderVQ, vae_config
from transfusion_jax.vae.config import resolve_vae
from transfusion_jax.vae.quantizer import (
    VectorQuantizer,
    code_histogram,
    commitment_loss,
    ema_codebook_update,
    nearest_codes,
    perplexity,
)
from transfusion_jax.vae.train_step import VAETrainProgram


def test_nearest_codes_equal_a_brute_force_search():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 6)).astype(np.float32)
    codebook = rng.normal(size=(50, 6)).astype(np.float32)
    distances = ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)  # [N, K], every pair
    np.testing.assert_array_equal(np.asarray(nearest_codes(z, codebook)), distances.argmin(1))


def test_the_quantizer_passes_gradients_straight_through_and_commits_in_closed_form():
    quantizer = VectorQuantizer(16, 4, nnx.Rngs(0))
    codebook = np.asarray(quantizer.codebook[...])
    z = jax.random.normal(jax.random.key(1), (2, 3, 3, 4))
    weights = jax.random.normal(jax.random.key(2), z.shape)

    def objective(z):
        z_q, _, commitment = quantizer(z)
        return jnp.sum(weights * z_q), commitment

    (value, commitment), grad = jax.value_and_grad(objective, has_aux=True)(z)
    ids = np.asarray(quantizer(z)[1])
    chosen = codebook[ids]  # [2, 3, 3, 4]
    # forward: the code vectors; backward: identity, so d sum(w * z_q) / dz = w
    np.testing.assert_allclose(value, np.sum(np.asarray(weights) * chosen), rtol=1e-5)
    np.testing.assert_allclose(grad, weights, rtol=1e-6)
    # commitment = mean((z - e)^2), its gradient 2 (z - e) / n, and none to the codebook
    diff = np.asarray(z) - chosen
    np.testing.assert_allclose(commitment, np.mean(diff**2), rtol=1e-5)
    grad_z = jax.grad(lambda z: commitment_loss(z, jnp.asarray(chosen)))(z)
    np.testing.assert_allclose(grad_z, 2 * diff / diff.size, rtol=1e-5, atol=1e-8)
    grad_e = jax.grad(lambda e: commitment_loss(z, e))(jnp.asarray(chosen))
    np.testing.assert_array_equal(grad_e, np.zeros_like(chosen))


def test_code_usage_is_counted():
    ids = np.array([3, 3, 0, 7, 3, 0], np.int32)
    counts = np.asarray(code_histogram(jnp.asarray(ids), 8))
    np.testing.assert_array_equal(counts, np.bincount(ids, minlength=8))
    p = np.bincount(ids, minlength=8) / len(ids)
    p = p[p > 0]
    np.testing.assert_allclose(perplexity(jnp.asarray(counts)), np.exp(-(p * np.log(p)).sum()))
    assert float(perplexity(jnp.ones(8))) == pytest.approx(8.0)


def numpy_ema_update(count, total, z, ids, picks, updates, decay, restart_share):
    """The rule of quantizer.py's docstring, written out in numpy."""
    k = len(count)
    n = np.bincount(ids, minlength=k).astype(np.float64)
    s = np.zeros_like(total)
    for vector, i in zip(z, ids, strict=True):
        s[i] += vector
    count = decay * count + (1 - decay) * n
    total = decay * total + (1 - decay) * s
    share, bias = len(z) / k, 1 - decay**updates
    dead = count / bias < restart_share * share
    count = np.where(dead, share * bias, count)
    total = np.where(dead[:, None], z[picks] * share * bias, total)
    return total / count[:, None], count, total, dead


def test_the_moving_average_codebook_and_its_restarts_match_a_numpy_recomputation():
    rng = np.random.default_rng(3)
    k, d, n, decay, share = 12, 3, 40, 0.9, 0.5
    count = rng.uniform(0, 6, k)
    count[:3] = 0.0  # never used: restarted
    total = rng.normal(size=(k, d)) * count[:, None]
    codebook = rng.normal(size=(k, d))
    z = rng.normal(size=(n, d))
    ids = rng.integers(3, k, n)  # codes 0..2 stay unused this step
    key = jax.random.key(4)
    picks = np.asarray(jax.random.randint(key, (k,), 0, n))  # the update's own draw
    params = {name: jnp.asarray(x, jnp.float32) for name, x in
              dict(codebook=codebook, ema_count=count, ema_sum=total).items()}  # fmt: skip
    z_, ids_ = jnp.asarray(z), jnp.asarray(ids)
    out, metrics = ema_codebook_update(params, z_, ids_, key, 7, decay, share)
    expected, e_count, e_total, dead = numpy_ema_update(
        count, total, z, ids, picks, 7, decay, share
    )
    np.testing.assert_allclose(out["codebook"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["ema_count"], e_count, rtol=1e-5)
    np.testing.assert_allclose(out["ema_sum"], e_total, rtol=1e-4, atol=1e-6)
    assert dead[:3].all() and metrics["codes_restarted"] == dead.sum()
    # a restarted code sits on a vector of this step
    np.testing.assert_allclose(out["codebook"][0], z[picks[0]], rtol=1e-5)
    assert float(metrics["codebook_usage"]) == pytest.approx(len(set(ids)) / k)


def test_a_live_code_is_the_mean_of_its_vectors_once_it_has_only_ever_seen_them():
    """From a zero start, the EMA ratio sum/count is the plain mean of the assigned vectors."""
    z = jnp.array([[1.0, 2.0], [3.0, 4.0], [10.0, 10.0]])
    ids = jnp.array([1, 1, 0])
    params = dict(codebook=jnp.zeros((2, 2)), ema_count=jnp.zeros(2), ema_sum=jnp.zeros((2, 2)))
    out, _ = ema_codebook_update(params, z, ids, jax.random.key(0), 1, 0.99, 0.0)
    np.testing.assert_allclose(out["codebook"], [[10.0, 10.0], [2.0, 3.0]], rtol=1e-5)


def vq_test_config(folder="unused", **train):
    cfg = vae_test_config(folder, **train)
    cfg.vae.update(kind="vq", codebook_size=32, latent_channels=4)
    return cfg


def test_a_tiny_vq_overfits_a_fixed_batch():
    cfg = vq_test_config()
    cfg.vae.update(channels=(16, 32), norm_groups=8)
    cfg.train.num_steps = 200
    cfg.optimizer.update(peak_lr=3e-3, warmup_steps=20, min_lr=3e-4)
    program = VAETrainProgram(cfg, make_mesh(1, 1, 1, ONE_DEVICE))
    state = program.init_state(0)
    x = smooth_images(4, SIZE).astype(np.float32) / 127.5 - 1
    step = program.compile(x)
    first = None
    for _ in range(cfg.train.num_steps):
        state, metrics = step(state, x)
        first = first or float(metrics["psnr"])
    scores = jax.device_get(program.compile_scores(x.shape)(state.params, x))
    # 4 images of 12x12 codes from 32: reconstructed through the codebook, far past the start
    assert float(np.mean(scores["psnr"])) > 24.0 and first < 15.0, (first, scores["psnr"])
    assert len(np.unique(scores["codes"])) >= 8  # the restarts keep codes alive
    assert "_codes" not in metrics and "codebook_usage" in metrics


def test_vq_training_logs_codebook_usage_and_load_vq_reads_the_tokenizer(tiny_tokenizer):
    workdir = tiny_tokenizer  # trained by train_vae (conftest)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    last = records[-1]
    assert 0 < last["val_codebook_usage"] <= 1 and last["val_psnr"] > 0
    assert {"commitment", "codebook_usage", "codes_restarted"} <= records[0].keys()
    tokenizer = load_vq(workdir)
    images = smooth_images(3, SIZE).astype(np.float32) / 127.5 - 1
    ids = np.asarray(tokenizer.encode_ids(images))
    assert ids.shape == (3, SIZE // 2, SIZE // 2) and ids.max() < 32
    # the ids are the nearest codes of the encoder's output, decoded from those code vectors
    z = np.asarray(tokenizer.module.encode(jnp.asarray(images))).reshape(-1, 4)
    codebook = np.asarray(tokenizer.module.quantizer.codebook[...])
    brute = ((z[:, None] - codebook[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(ids.reshape(-1), brute)
    np.testing.assert_allclose(
        tokenizer.decode_ids(ids), tokenizer.module.decode(jnp.asarray(codebook[ids])), atol=1e-5
    )
    with pytest.raises(ValueError, match="VQ tokenizer"):
        load_vae(workdir)


def test_vq_configs_build_and_bad_values_name_their_field():
    for name, codes in (("vq_tiny", 512), ("vq_paper", 16_384)):
        cfg = resolve_vae(load_config(str(ROOT / "configs" / f"{name}.py")))
        abstract = nnx.eval_shape(lambda cfg=cfg: AutoencoderVQ(cfg.vae, nnx.Rngs(0)))
        assert abstract.quantizer.codebook.shape == (codes, cfg.vae.latent_channels)
    cfg = load_config(str(ROOT / "configs" / "vq_tiny.py"))
    cfg.vae.kind = "vqgan"
    with pytest.raises(ValueError, match="vae.kind"):
        resolve_vae(cfg)
    assert vae_config().kind == "kl"  # imported diffusers VAEs and older runs stay KL


def test_unused_codes_are_restarted_within_the_decay_horizon_and_used_ones_never():
    """Codes 2 and 3 win vectors at the first step only; 0 and 1 win every step after. With
    decay d and restart_share s an unused code's count falls below s of its share within
    about ln(s) / ln(d) steps (22 here), when it moves onto one of that step's vectors."""
    decay, share = 0.9, 0.1
    rng = np.random.default_rng(0)
    params = dict(codebook=jnp.zeros((4, 2)), ema_count=jnp.zeros(4), ema_sum=jnp.zeros((4, 2)))
    restarted_at = {}
    for step in range(1, 61):
        z = rng.normal(size=(8, 2)).astype(np.float32)
        ids = np.array([0, 1, 2, 3] * 2) if step == 1 else np.array([0, 1] * 4)
        old = np.asarray(params["codebook"])
        params, metrics = ema_codebook_update(
            params, jnp.asarray(z), jnp.asarray(ids), jax.random.key(step), step, decay, share
        )
        new = np.asarray(params["codebook"])
        for code in (2, 3):  # (at step 1 every code becomes the mean of its vectors)
            if step > 1 and code not in restarted_at and not np.allclose(new[code], old[code]):
                restarted_at[code] = step
                assert any(np.allclose(new[code], v) for v in z)  # onto a vector of this step
        if step > 1:  # the live codes follow their vectors: never restarted
            assert not any(np.allclose(new[c], v) for c in (0, 1) for v in z)
    assert set(restarted_at) == {2, 3}
    assert all(1 < s <= 22 for s in restarted_at.values()), restarted_at
