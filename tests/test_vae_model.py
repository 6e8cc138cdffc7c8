"""The KL autoencoder against diffusers' AutoencoderKL (PyTorch), the independent reference.

Each reference model has every parameter perturbed (GroupNorm weights start at exactly 1 and
biases at 0, which would hide a swapped or untransposed tensor), is saved with save_pretrained and
read back through load_vae, the path a real SD / FLUX VAE takes.
"""

import json
import re
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from transfusion_jax.sharding import RULES
from transfusion_jax.vae import VAE, AutoencoderKL, load_vae, vae_config

torch = pytest.importorskip("torch", reason="the reference VAE is diffusers' PyTorch model")
diffusers = pytest.importorskip("diffusers", reason="the reference VAE is diffusers' AutoencoderKL")

SD_LIKE = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
)
FLUX_LIKE = dict(
    block_out_channels=(32, 32, 64),
    layers_per_block=2,
    norm_num_groups=8,
    latent_channels=16,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)
CONFIGS = {"sd": SD_LIKE, "flux": FLUX_LIKE}
# float32 on CPU: the two implementations differ only in summation order (~1e-6 relative).
RTOL = 1e-4


def torch_vae(kwargs, seed=0):
    levels = len(kwargs["block_out_channels"])
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        **kwargs,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms' 1/0 and biases' 0 become distinct random values
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.03))
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    """(name, torch model, directory written by save_pretrained)."""
    model = torch_vae(CONFIGS[request.param])
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory, safe_serialization=True)
    return request.param, model, directory


def relative(ours, reference) -> float:
    return float(np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)))


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def test_encode_and_decode_match_diffusers(saved):
    name, model, directory = saved
    vae = load_vae(directory)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        posterior = model.encode(nchw(x)).latent_dist
        mean_ref, logvar_ref = nhwc(posterior.mean), nhwc(posterior.logvar)
    mean, logvar = vae.encode(x)
    z = rng.normal(size=mean_ref.shape).astype(np.float32)
    with torch.no_grad():
        x_ref = nhwc(model.decode(nchw(z)).sample)
    decoded = vae.decode(z)
    diffs = dict(
        mean=relative(mean, mean_ref),
        logvar=relative(logvar, logvar_ref),
        decode=relative(decoded, x_ref),
    )
    print(f"{name}: max |ours - diffusers| / max |diffusers|: {diffs}")
    assert all(d < RTOL for d in diffs.values()), diffs
    # VAE.latents: the normalised posterior mean, or a normalised posterior sample given a key.
    np.testing.assert_allclose(vae.latents(x), vae.normalize(mean), rtol=0, atol=1e-6)
    sample = vae.denormalize(vae.latents(x, jax.random.key(1)))
    noise = (sample - mean) / np.exp(0.5 * np.asarray(logvar))
    assert 0.9 < float(np.std(noise)) < 1.1


def test_output_shapes_follow_the_downsampling_factor():
    for channels, latent in (((32, 64), 4), ((32, 32, 64), 16)):
        cfg = vae_config(channels=channels, blocks=1, norm_groups=8, latent_channels=latent)
        module = AutoencoderKL(cfg, nnx.Rngs(0))
        f = 2 ** (len(channels) - 1)
        x = jax.ShapeDtypeStruct((2, 64, 64, 3), np.float32)
        mean, logvar = nnx.eval_shape(lambda m, x: m.encode(x), module, x)
        assert mean.shape == logvar.shape == (2, 64 // f, 64 // f, latent)
        z = jax.ShapeDtypeStruct(mean.shape, np.float32)
        assert nnx.eval_shape(lambda m, z: m.decode(z), module, z).shape == (2, 64, 64, 3)
        vae = VAE.from_config(cfg, module)
        assert (vae.downsample, vae.latent_channels) == (f, latent)
        assert vae.latent_shape(64) == (64 // f, 64 // f, latent)
        assert vae.latent_shape((64, 32)) == (64 // f, 32 // f, latent)
        with pytest.raises(ValueError, match=f"multiple of the VAE's downsampling factor {f}"):
            vae.latent_shape(64 + f // 2)


def test_parameter_count_is_the_papers_and_diffusers():
    cfg = vae_config(channels=(128, 256, 512, 512), blocks=2, latent_channels=8)
    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, nnx.Rngs(0)))
    ours = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    with torch.device("meta"):  # no allocation
        reference = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=8,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
    assert ours == sum(p.numel() for p in reference.parameters())
    assert abs(ours - 86e6) < 0.1 * 86e6, ours


def test_every_weight_has_logical_axis_names_the_rules_know():
    cfg = vae_config(channels=(32, 64), blocks=1, norm_groups=8)
    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, nnx.Rngs(0)))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract, nnx.Param)))
    shapes = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    for spec, shape in zip(jax.tree.leaves(specs), jax.tree.leaves(shapes), strict=True):
        assert len(spec) == shape.ndim and all(n is None or n in RULES for n in spec), spec


def test_scale_and_shift_come_from_the_config(saved):
    name, _, directory = saved
    vae = load_vae(directory)
    c = CONFIGS[name]["latent_channels"]
    # save_pretrained writes shift_factor: null when it is not set; that means no shift.
    want_scale = CONFIGS[name].get("scaling_factor", 0.18215)
    want_shift = CONFIGS[name].get("shift_factor", 0.0)
    assert vae.scale.dtype == vae.shift.dtype == np.float32
    np.testing.assert_array_equal(vae.scale, np.full(c, want_scale, np.float32))
    np.testing.assert_array_equal(vae.shift, np.full(c, want_shift, np.float32))
    z = np.random.default_rng(0).normal(size=(1, 2, 2, c)).astype(np.float32)
    np.testing.assert_allclose(vae.normalize(z), (z - want_shift) * want_scale, rtol=1e-6)
    np.testing.assert_allclose(vae.denormalize(vae.normalize(z)), z, rtol=1e-5, atol=1e-6)


def test_per_channel_latent_statistics_become_scale_and_shift(saved, tmp_path):
    name, _, directory = saved
    stats = copy_of(directory, tmp_path)
    c = CONFIGS[name]["latent_channels"]
    mean, std = np.linspace(-1, 1, c), np.linspace(0.5, 2, c)
    config = json.loads((stats / "config.json").read_text())
    config.update(latents_mean=mean.tolist(), latents_std=std.tolist(), scaling_factor=0.5)
    (stats / "config.json").write_text(json.dumps(config))
    vae = load_vae(stats)
    np.testing.assert_allclose(vae.shift, mean, rtol=1e-6)
    np.testing.assert_allclose(vae.scale, 0.5 / std, rtol=1e-6)


def copy_of(directory, tmp_path):
    target = tmp_path / "vae"
    shutil.copytree(directory, target)
    return target


def rewrite_weights(directory, edit):
    file = directory / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(file))
    save_file(edit(dict(tensors)), str(file))


def test_legacy_attention_names_and_conv_shaped_projections_load(saved, tmp_path):
    _, _, directory = saved
    legacy = copy_of(directory, tmp_path)
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def to_legacy(tensors):
        out = {}
        for key, value in tensors.items():
            for new, old in names.items():
                if f".attentions.0.{new}." in key:
                    key = key.replace(f".{new}.", f".{old}.")
                    value = value[:, :, None, None] if value.ndim == 2 else value
            out[key] = value
        return out

    rewrite_weights(legacy, to_legacy)
    a, b = nnx.state(load_vae(directory).module), nnx.state(load_vae(legacy).module)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_missing_and_unexpected_tensors_are_named(saved, tmp_path):
    _, _, directory = saved
    broken = copy_of(directory, tmp_path)
    rewrite_weights(broken, lambda t: {k: v for k, v in t.items() if k != "decoder.conv_out.bias"})
    with pytest.raises(ValueError, match=r"missing: decoder\.conv_out\.bias \(3,\)") as e:
        load_vae(broken)
    assert str(broken) in str(e.value)

    extra = np.zeros((2, 2), np.float32)
    rewrite_weights(broken, lambda t: {**t, "decoder.conv_out.bias": extra, "encoder.extra": extra})
    with pytest.raises(ValueError, match=r"unexpected: encoder\.extra \(2, 2\).*misshapen"):
        load_vae(broken)


def test_unusable_directories_say_what_is_expected(saved, tmp_path):
    _, _, directory = saved
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(directory / "config.json", no_weights)
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model.safetensors"):
        load_vae(no_weights)
    (no_weights / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="convert .bin to safetensors"):
        load_vae(no_weights)

    unet = copy_of(directory, tmp_path)
    config = json.loads((unet / "config.json").read_text())
    (unet / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    wrong_class = f"{re.escape(str(unet))}.*UNet2DModel config, not AutoencoderKL"
    with pytest.raises(ValueError, match=wrong_class):
        load_vae(unet)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(empty))}: not a VAE.*config.json"):
        load_vae(empty)
    with pytest.raises(FileNotFoundError, match="no such VAE directory"):
        load_vae(tmp_path / "absent")


def test_lpips_matches_a_torch_vgg16_reference(tmp_path):
    """The perceptual distance against the same formula in PyTorch on torchvision's VGG16 layer
    layout (features.N), random weights and random lin weights, loaded from safetensors."""
    from safetensors.torch import save_file

    from transfusion_jax.vae.perceptual import load_lpips

    torch.manual_seed(0)
    layers, c = [], 3
    for item in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if item == "M":
            layers.append(torch.nn.MaxPool2d(2, 2))
        else:
            layers += [torch.nn.Conv2d(c, item, 3, padding=1), torch.nn.ReLU()]
            c = item
    features = torch.nn.Sequential(*layers)
    lins = [torch.rand(1, w, 1, 1) for w in (64, 128, 256, 512, 512)]
    tensors = {f"features.{k}": v for k, v in features.state_dict().items()}
    tensors.update({f"lin{i}.model.1.weight": w for i, w in enumerate(lins)})
    save_file(tensors, str(tmp_path / "lpips.safetensors"))

    rng = np.random.default_rng(0)
    x, y = (rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32) for _ in range(2))

    def reference(a, b):
        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        ha, hb = (nchw(a) - shift) / scale, (nchw(b) - shift) / scale
        total, tap = 0.0, 0
        for index, layer in enumerate(features):
            ha, hb = layer(ha), layer(hb)
            if index in (3, 8, 15, 22, 29):
                na = ha / (ha.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                nb = hb / (hb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + ((na - nb) ** 2 * lins[tap]).sum(1).mean((1, 2))
                tap += 1
        return total.numpy()

    with torch.no_grad():
        expected = reference(x, y)
    ours = np.asarray(load_lpips(tmp_path / "lpips.safetensors")(x, y))
    np.testing.assert_allclose(ours, expected, rtol=1e-4)
    assert np.all(np.asarray(load_lpips(tmp_path / "lpips.safetensors")(x, x)) < 1e-6)
    save_file(
        {"features.0.weight": tensors["features.0.weight"]}, str(tmp_path / "bad.safetensors")
    )
    with pytest.raises(ValueError, match="bad.safetensors lacks torchvision VGG16 tensors"):
        load_lpips(tmp_path / "bad.safetensors")
