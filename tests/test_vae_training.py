"""VAE training and the latent-space path: the loss terms against closed forms, the held-out scores
against scikit-image, the split, an overfit, exact resume, `load_vae` of a workdir with its latent
statistics, clear errors for a bad vae_path, the latent cache, and Transfusion trained and sampled
in latent space end to end."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image as PILImage

from tests.helpers import ROOT, command_env, tiny_config
from transfusion_jax.config import load_config, resolve_model
from transfusion_jax.data import make_source
from transfusion_jax.data.images import load_image
from transfusion_jax.data.split import held_out
from transfusion_jax.sharding import make_mesh
from transfusion_jax.train import train
from transfusion_jax.train_vae import train_vae
from transfusion_jax.vae import load_vae
from transfusion_jax.vae.autoencoder import AutoencoderKL, sample_posterior
from transfusion_jax.vae.data import ImageBatches, first_images
from transfusion_jax.vae.loss import kl_to_standard_normal, psnr, vae_loss
from transfusion_jax.vae.train_step import VAETrainProgram

SIZE = 16  # image side in these tests; the tiny VAE below downsamples by 2 -> 8x8x4 latents


def smooth_images(n: int, size: int = 24, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3]: random 4x4 colour fields, upsampled (an autoencoder can learn
    them, unlike white noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return np.stack(
        [np.asarray(PILImage.fromarray(c).resize((size, size), PILImage.BICUBIC)) for c in coarse]
    )


def write_folder(root: pathlib.Path, n: int) -> pathlib.Path:
    (root / "images").mkdir(parents=True)
    rows = []
    for i, pixels in enumerate(smooth_images(n)):
        PILImage.fromarray(pixels).save(root / "images" / f"{i}.png")
        rows.append(json.dumps({"file_name": f"images/{i}.png", "text": f"colours {i % 7}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def vae_test_config(folder, **train):
    cfg = load_config(str(ROOT / "configs" / "vae_tiny.py"))
    cfg.vae.update(channels=(8, 16), blocks=1, norm_groups=4, latent_channels=4)
    cfg.data.update(path=str(folder), image_size=SIZE, num_threads=1, held_out_percent=20.0)
    cfg.train.update(
        dict(
            num_steps=6,
            batch_size=4,
            log_every=2,
            checkpoint_every=3,
            eval_every=3,
            eval_images=4,
            stats_images=8,
        ),
        **train,
    )
    cfg.optimizer.update(peak_lr=3e-3, warmup_steps=2, min_lr=3e-4)
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
    return cfg


ONE_DEVICE = jax.devices()[:1]
TWO_DEVICES = jax.devices()[:2]  # the trainer runs sharded (fsdp=2), as on a real mesh


def sharded_program(cfg) -> VAETrainProgram:
    """cfg's program on the trainer's mesh (fsdp over 2 devices): for a vae_test_config, its
    init_state is the very program trained_vae's trainer compiles (compiled once a session)."""
    cfg.mesh.fsdp = 2
    return VAETrainProgram(cfg, make_mesh(1, 2, 1, TWO_DEVICES))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("vae") / "folder", 40)


@pytest.fixture(scope="module")
def trained_vae(folder, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vae") / "run"
    cfg = vae_test_config(folder)
    cfg.mesh.fsdp = 2
    train_vae(cfg, workdir, devices=TWO_DEVICES)
    return workdir


# -- the objective ----------------------------------------------------------------------------


def test_kl_and_reconstruction_terms_match_closed_forms():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    logvar = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    expected = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
    np.testing.assert_allclose(kl_to_standard_normal(mean, logvar), expected, rtol=1e-5)
    zeros = np.zeros((1, 2, 2, 4), np.float32)
    assert float(kl_to_standard_normal(zeros, zeros)[0]) == 0.0  # the prior itself
    x = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    y = x + 0.1
    np.testing.assert_allclose(psnr(x, y), 10 * np.log10(4 / 0.01), rtol=1e-5)

    cfg = vae_test_config("unused")
    cfg.loss.update(l2_weight=0.5, kl_weight=0.01)
    program = sharded_program(cfg)
    module = program.autoencoder(program.init_state(0).params)
    key = jax.random.key(3)
    x = rng.uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    loss_fn = nnx.jit(lambda m, x, key: vae_loss(m, None, x, key, jnp.int32(0), cfg.loss))
    loss, metrics = loss_fn(module, x, key)  # jitted: eager NNX convolutions compile one by one
    # The same terms recomputed in numpy from the module's own posterior and decoder.
    m, lv = (np.asarray(a) for a in nnx.jit(lambda m, x: m.encode(x))(module, x))
    z = m + np.exp(0.5 * lv) * np.asarray(jax.random.normal(key, m.shape))
    error = np.asarray(nnx.jit(lambda m, z: m.decode(z))(module, z)) - x
    kl = np.mean(0.5 * np.sum(m**2 + np.exp(lv) - 1 - lv, axis=(1, 2, 3))) / x[0].size
    l1, l2 = np.abs(error).mean(), (error**2).mean()
    np.testing.assert_allclose(
        [metrics["l1"], metrics["l2"], metrics["kl"]], [l1, l2, kl], rtol=1e-4
    )
    np.testing.assert_allclose(loss, l1 + 0.5 * l2 + 0.01 * kl, rtol=1e-4)


def test_the_discriminator_trains_only_from_its_start_step():
    cfg = vae_test_config("unused")
    cfg.loss.update(disc_weight=0.5, disc_start=10, disc_channels=8, disc_layers=2)
    program = VAETrainProgram(cfg, make_mesh(1, 1, 1, ONE_DEVICE))
    state = program.init_state(0)
    x = smooth_images(4, SIZE).astype(np.float32) / 127.5 - 1
    grad = jax.jit(lambda p, step: program._gradients(p, x, jax.random.key(0), step))
    before, _ = grad(state.params, jnp.int32(9))
    after, metrics = grad(state.params, jnp.int32(10))
    norm = lambda tree: float(optax_norm(tree))
    assert norm(before["discriminator"]) == 0.0 and norm(after["discriminator"]) > 0.0
    assert norm(before["autoencoder"]) != norm(after["autoencoder"])  # + the adversarial term
    assert np.isfinite(float(metrics["d_loss"])) and np.isfinite(float(metrics["g_loss"]))


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_held_out_scores_match_scikit_image(folder):
    skimage_metrics = pytest.importorskip("skimage.metrics", reason="needs scikit-image")
    cfg = vae_test_config(folder)
    program = sharded_program(cfg)
    state = program.init_state(0)
    images = first_images(cfg, 4, held=True)
    scores = jax.device_get(program.compile_scores(images.shape)(state.params, images))
    module = program.autoencoder(state.params)
    mean, _ = module.encode(images)
    rebuilt = np.clip(np.asarray(module.decode(mean)), -1, 1)
    x, y = (images + 1) / 2, (rebuilt + 1) / 2
    for i in range(len(images)):
        ssim = skimage_metrics.structural_similarity(
            x[i],
            y[i],
            data_range=1.0,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert abs(float(scores["ssim"][i]) - ssim) < 1e-3, (scores["ssim"][i], ssim)
        expected_psnr = skimage_metrics.peak_signal_noise_ratio(x[i], y[i], data_range=1.0)
        assert abs(float(scores["psnr"][i]) - expected_psnr) < 1e-2
        l1 = np.abs(images[i] - rebuilt[i]).mean()  # on [-1, 1], as the training l1
        np.testing.assert_allclose(scores["l1"][i], l1, rtol=1e-4)


# -- data -------------------------------------------------------------------------------------


def test_held_out_split_is_fixed_by_file_name_and_never_trained_on(folder):
    assert held_out("/a/b/images/7.png", 20.0) == held_out("/elsewhere/images/7.png", 20.0)
    names = [f"images/{i}.png" for i in range(2000)]
    share = np.mean([held_out(n, 5.0) for n in names])
    assert 0.03 < share < 0.07  # about 5%
    cfg = vae_test_config(folder)
    held = first_images(cfg, 100, held=True)
    train_images = first_images(cfg, 100, held=False)
    assert len(held) + len(train_images) == 40 and len(held) >= 2
    batches = ImageBatches(cfg, 4)
    seen = np.concatenate([next(batches) for _ in range(30)])  # 3 epochs of the training split
    distance = np.abs(seen[:, None] - held[None]).max(axis=(2, 3, 4))  # [seen, held]
    assert distance.min() > 0.05  # no held-out image was drawn for training
    assert np.abs(seen[:, None] - train_images[None]).max(axis=(2, 3, 4)).min(axis=1).max() < 1e-6


def test_image_batches_resume_exactly(folder):
    cfg = vae_test_config(folder)
    batches = ImageBatches(cfg, 4)
    next(batches)
    state = json.loads(json.dumps(batches.get_state()))
    expected = [next(batches) for _ in range(3)]
    resumed = ImageBatches(cfg, 4)
    resumed.set_state(state)
    for batch in expected:
        np.testing.assert_array_equal(next(resumed), batch)


# -- training ---------------------------------------------------------------------------------


def test_a_tiny_vae_overfits_a_fixed_batch_past_30_db():
    cfg = vae_test_config("unused")
    cfg.vae.update(channels=(16, 32), latent_channels=4, norm_groups=8)
    cfg.train.num_steps = 200  # about 37 dB by then (41 dB after 400 steps)
    cfg.optimizer.update(peak_lr=3e-3, warmup_steps=20, min_lr=3e-4)
    program = VAETrainProgram(cfg, make_mesh(1, 1, 1, ONE_DEVICE))
    state = program.init_state(0)
    x = smooth_images(4, SIZE).astype(np.float32) / 127.5 - 1
    step = program.compile(x)
    for _ in range(cfg.train.num_steps):
        state, metrics = step(state, x)
    scores = jax.device_get(program.compile_scores(x.shape)(state.params, x))
    assert float(np.mean(scores["psnr"])) > 30.0, scores["psnr"]


def test_vae_training_logs_held_out_scores_and_resumes_exactly(folder, tmp_path, trained_vae):
    cfg = vae_test_config(folder)
    cfg.mesh.fsdp = 2  # as the uninterrupted run (trained_vae): weights and batch sharded
    stopped = tmp_path / "stopped"
    train_vae(cfg, stopped, devices=TWO_DEVICES, stop_at_step=3)
    train_vae(cfg, stopped, devices=TWO_DEVICES)
    records = [json.loads(line) for line in (trained_vae / "metrics.jsonl").open()]
    resumed = [json.loads(line) for line in (stopped / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [2, 3, 4, 6]  # logging steps and evaluations
    assert {"val_psnr", "val_ssim", "val_l1"} <= records[1].keys() | records[-1].keys()
    assert records[-1]["val_psnr"] > 0 and 0 < records[-1]["val_ssim"] <= 1
    for a, b in zip(records, resumed, strict=True):
        for key in ("loss", "l1", "kl", "val_psnr"):
            if key in a:
                assert a[key] == b[key], (a["step"], key)


def test_load_vae_of_a_workdir_normalises_with_its_latent_statistics(folder, trained_vae):
    vae = load_vae(trained_vae)
    info = json.loads((trained_vae / "checkpoints" / "6" / "info" / "metadata").read_text())
    np.testing.assert_allclose(vae.scale, 1 / np.asarray(info["latent_std"]), rtol=1e-6)
    np.testing.assert_allclose(vae.shift, info["latent_mean"], rtol=1e-6)
    assert info["latent_images"] == 8
    # Independently: normalised posterior samples of those training images have per-channel
    # mean ~0 and std ~1 (the statistics were measured on one sample; this is another).
    images = first_images(vae_test_config(folder), 8, held=False)
    z = np.asarray(vae.latents(images, jax.random.key(5))).reshape(-1, 4)
    assert np.all(np.abs(z.mean(0)) < 0.2) and np.all(np.abs(z.std(0) - 1) < 0.2)


def test_a_bad_vae_path_fails_at_start_naming_it(tmp_path, folder):
    cfg = tiny_config()
    cfg.data.update(source="imagefolder", path=str(folder), image_size=SIZE, latents="vae")
    cfg.image.update(latent_size=0, latent_channels=0)
    cfg.image.vae_path = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="image.vae_path: .*nowhere does not exist"):
        resolve_model(cfg)
    cfg.image.vae_path = ""
    with pytest.raises(ValueError, match="image.vae_path: data.latents='vae' needs the VAE"):
        resolve_model(cfg)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    cfg.image.vae_path = str(junk)
    with pytest.raises(ValueError, match="image.vae_path: .*UNet2DModel config"):
        resolve_model(cfg)
    transfusion_run = tmp_path / "run"
    (transfusion_run / "checkpoints").mkdir(parents=True)
    cfg.image.vae_path = str(transfusion_run)
    with pytest.raises(ValueError, match="holds no trained VAE"):
        train(cfg, tmp_path / "never", devices=ONE_DEVICE)
    # A diffusers directory whose config is fine but whose weights file is not.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(
        json.dumps({"_class_name": "AutoencoderKL", "block_out_channels": [8, 16]})
    )
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    cfg.image.vae_path = str(broken)
    with pytest.raises(ValueError, match="image.vae_path: .*not a readable safetensors file"):
        train(cfg, tmp_path / "never", devices=ONE_DEVICE)
    assert not (tmp_path / "never").exists()  # refused before the workdir was made


def test_latent_size_follows_the_vae_and_must_agree(folder, trained_vae):
    cfg = latent_config(folder, trained_vae)
    resolved = resolve_model(cfg)
    assert (resolved.image.latent_size, resolved.image.latent_channels) == (SIZE // 2, 4)
    cfg.image.latent_size = 16
    with pytest.raises(ValueError, match="image.latent_size: 16 disagrees with the VAE"):
        resolve_model(cfg)
    cfg.image.latent_size, cfg.data.image_size = 0, 15
    with pytest.raises(ValueError, match="data.image_size: 15 is not a multiple"):
        resolve_model(cfg)


def latent_config(folder, vae_path, **data):
    cfg = tiny_config()
    cfg.data.update(
        dict(
            source="imagefolder",
            path=str(folder),
            image_size=SIZE,
            latents="vae",
            seq_len=160,
            pack_window=16,
            num_threads=1,
        ),
        **data,
    )
    cfg.image.update(latent_size=0, latent_channels=0, vae_path=str(vae_path), patch_size=2)
    cfg.train.update(num_steps=3, batch_size=2, log_every=1, checkpoint_every=3)
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
    return cfg


def test_the_train_step_encodes_pixels_as_the_vae_does(folder, trained_vae):
    from transfusion_jax.train_step import TrainProgram

    cfg = latent_config(folder, trained_vae)
    cfg.image.vae_sample = False
    program = TrainProgram(cfg, make_mesh(1, 1, 1, ONE_DEVICE))
    batch = next(make_source(cfg, 2))
    assert batch.latents.shape[2:] == (SIZE, SIZE, 3)  # pixels travel to the devices
    encoded = program.encode_images(program.frozen, jax.tree.map(jnp.asarray, batch), None)
    vae = load_vae(trained_vae)
    flat = batch.latents.reshape(-1, SIZE, SIZE, 3)
    expected = np.asarray(vae.latents(flat)).reshape(*batch.latents.shape[:2], 8, 8, 4)
    np.testing.assert_allclose(encoded.latents, expected, atol=1e-5)
    # With image.vae_sample, a posterior sample drawn with the step's key.
    cfg.image.vae_sample = True
    program = TrainProgram(cfg, make_mesh(1, 1, 1, ONE_DEVICE))
    key = jax.random.key(11)
    encoded = program.encode_images(program.frozen, jax.tree.map(jnp.asarray, batch), key)
    sampled = vae.normalize(sample_posterior(*vae.encode(flat), key))
    np.testing.assert_allclose(
        encoded.latents, np.asarray(sampled).reshape(encoded.latents.shape), atol=1e-5
    )
    assert np.abs(encoded.latents - expected).max() > 1e-3


def test_latent_cache_holds_the_posterior_and_is_checked(folder, trained_vae, tmp_path):
    from transfusion_jax.data.cache import write_cache
    from transfusion_jax.data.sources import CachedSource, ImageFolderSource

    vae = load_vae(trained_vae)
    records = ImageFolderSource(folder)
    written, skipped = write_cache(records, SIZE, tmp_path / "z.array_record", vae=vae, batch=16)
    assert (written, skipped) == (40, 0)
    cached = CachedSource(tmp_path / "z.array_record")
    pixels = np.stack([load_image(records[i]["image"], SIZE) for i in range(40)])
    mean, logvar = (np.asarray(a) for a in vae.encode(pixels))
    np.testing.assert_allclose(np.stack([cached[i]["latent"] for i in range(40)]), mean, atol=2e-2)
    np.testing.assert_allclose(cached[3]["logvar"], logvar[3], atol=5e-2)  # float16 storage
    # Read for training: normalised by the VAE's statistics, the posterior mean or a sample.
    normalised = np.asarray(vae.normalize(mean)).reshape(40, -1)
    cfg = latent_config(tmp_path / "z.array_record", trained_vae, source="cached")
    for sample in (False, True):
        cfg.image.vae_sample = sample
        batch = next(make_source(cfg, 2))
        assert batch.latents.shape[2:] == (8, 8, 4)
        got = batch.latents[:, 0].reshape(2, -1)  # the first image of each row
        distance = np.abs(got[:, None] - normalised[None]).max(axis=-1).min(axis=1)
        if not sample:
            assert distance.max() < 2e-2  # exactly some record's normalised mean
        else:
            assert distance.min() > 0.05  # a draw from the posterior, not its mean
            row = int(np.abs(got[0][None] - normalised).mean(axis=-1).argmin())
            std = np.exp(0.5 * logvar[row]).reshape(-1) * np.tile(vae.scale, 64)
            z = (got[0] - normalised[row]) / std
            assert abs(float(z.mean())) < 0.3 and 0.7 < float(z.std()) < 1.3
    write_cache(records, SIZE, tmp_path / "pixels.array_record")
    cfg.data.path = str(tmp_path / "pixels.array_record")
    with pytest.raises(ValueError, match="holds pixels; write it again .* --vae PATH"):
        make_source(cfg, 2)


def test_transfusion_trains_in_latent_space_and_sample_writes_decoded_pngs(
    folder, trained_vae, tmp_path
):
    workdir = tmp_path / "latent_run"
    record = train(latent_config(folder, trained_vae), workdir, devices=ONE_DEVICE)
    assert record["step"] == 3 and np.isfinite(record["loss"])
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["image"]["latent_size"] == 8 and saved["image"]["latent_channels"] == 4
    env = command_env()
    out = tmp_path / "samples"
    cmd = [sys.executable, "-m", "transfusion_jax.sample", "--workdir", str(workdir)]
    cmd += ["--prompt", "colours 3", "--num", "2", "--steps", "3", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("000.png", "001.png"):
        assert PILImage.open(out / name).size == (SIZE, SIZE)  # decoded: pixels, not 8x8x4
    with pytest.raises(ValueError, match="holds no trained VAE"):
        load_vae(workdir)  # a Transfusion run is not a VAE
    cmd = [sys.executable, "-m", "transfusion_jax.sample", "--workdir", str(workdir)]
    cmd += ["--image", str(folder / "images" / "0.png"), "--max_new_tokens", "3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_config_files_build(folder):
    paper = load_config(str(ROOT / "configs" / "vae_paper.py"))
    abstract = nnx.eval_shape(lambda: AutoencoderKL(paper.vae, nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert abs(count - 86e6) / 86e6 < 0.10
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    mean, _ = nnx.eval_shape(lambda m, x: m.encode(x), abstract, x)
    assert mean.shape == (1, 32, 32, 8)  # the paper's latent
    tiny = ml_collections.ConfigDict(load_config(str(ROOT / "configs" / "vae_tiny.py")))
    tiny.data.image_size = 30
    with pytest.raises(ValueError, match="data.image_size: 30 is not a multiple of the VAE's"):
        VAETrainProgram.resolve(tiny)


def test_the_perceptual_loss_trains_with_user_supplied_vgg_weights(tmp_path):
    from safetensors.numpy import save_file

    from transfusion_jax.vae.perceptual import VGG16, load_lpips

    rng = np.random.default_rng(0)
    tensors, c, index = {}, 3, 0
    for item in VGG16:  # random weights in torchvision's layout: features.N.weight [O, I, 3, 3]
        if item == "M":
            index += 1
            continue
        tensors[f"features.{index}.weight"] = rng.normal(0, 0.1, (item, c, 3, 3)).astype("f4")
        tensors[f"features.{index}.bias"] = np.zeros(item, "f4")
        c, index = item, index + 2
    save_file(tensors, str(tmp_path / "vgg.safetensors"))
    cfg = vae_test_config("unused")
    cfg.loss.update(perceptual_weight=1.0, perceptual_path=str(tmp_path / "vgg.safetensors"))
    program = sharded_program(cfg)
    x = smooth_images(4, SIZE).astype(np.float32) / 127.5 - 1
    state = program.init_state(0)
    # The logged term is LPIPS of the images and their reconstruction (recomputed here first:
    # the step consumes the state).
    module = program.autoencoder(state.params)
    mean, logvar = module.encode(x)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    expected = np.mean(load_lpips(tmp_path / "vgg.safetensors")(x, module.decode(z)))
    _, metrics = program.compile(x)(state, x)
    np.testing.assert_allclose(float(metrics["perceptual"]), expected, rtol=1e-4)
    no_weights = vae_test_config("unused")
    no_weights.loss.perceptual_weight = 1.0
    with pytest.raises(ValueError, match="loss.perceptual_path: loss.perceptual_weight > 0 needs"):
        VAETrainProgram.resolve(no_weights)
