"""FID: the Fréchet distance, the torch-free .pth reader and the Inception network, each against
an independent reference (closed forms, pytorch-fid, torch itself).

The network test builds pytorch-fid's own FIDInceptionV3 around a torchvision Inception whose
every parameter and BatchNorm statistic is perturbed to distinct random values (so a swapped,
untransposed or misrouted tensor shows), saves its state dict with torch.save, loads that file
through `load_inception` and compares the 2048-d pool3 features on the same images.
"""

import collections
import io
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
import scipy.linalg
from safetensors.numpy import save_file

from tests.helpers import importable_torchvision
from transfusion_jax.evaluation.frechet import (
    feature_statistics,
    fid,
    fid_from_features,
    frechet_distance,
)
from transfusion_jax.evaluation.inception import (
    FID_WEIGHTS_NAME,
    InceptionFeatures,
    load_inception,
    resize_bilinear,
)
from transfusion_jax.evaluation.torch_weights import (
    UnsafePickleError,
    load_torch_state_dict,
    load_weights,
)

# float32 on CPU: the two networks differ only in summation order.
RTOL = 1e-4


def relative(ours, reference) -> float:
    return float(np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)))


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="the references are torch and pytorch-fid")


@pytest.fixture(scope="module")
def pytorch_fid(torch):
    if importable_torchvision(torch) is None:
        pytest.skip("pytorch-fid builds on torchvision's Inception, which is not installed")
    pytest.importorskip("pytorch_fid", reason="the reference FID is pytorch-fid")
    import pytorch_fid.fid_score
    import pytorch_fid.inception

    return pytorch_fid


# --- the Fréchet distance ----------------------------------------------------------------------


def random_covariance(rng, d, condition=10.0):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * np.geomspace(1.0, 1.0 / condition, d)) @ q.T


def scipy_frechet_distance(mu1, s1, mu2, s2):
    """pytorch-fid's calculate_frechet_distance (sqrtm of the product, real part), written out:
    pytorch-fid 0.3.0 unpacks sqrtm(..., disp=False) into two values, which current scipy no
    longer returns."""
    root = scipy.linalg.sqrtm(s1 @ s2)
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    for d in (1, 5, 64):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = random_covariance(rng, d), random_covariance(rng, d, condition=100.0)
        reference = scipy_frechet_distance(mu1, s1, mu2, s2)
        np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), reference, rtol=1e-9)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 2.0, size=8), rng.uniform(0.1, 2.0, size=8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    # Commuting (diagonal) covariances: sum (sqrt(a) - sqrt(b))^2 + ||mu1 - mu2||^2.
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # 1-D, scalars: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s.
    np.testing.assert_allclose(frechet_distance(1.0, 4.0, -2.0, 9.0), 9.0 + 1.0, rtol=1e-12)
    # Identical statistics are at distance 0 (up to rounding), never negative.
    s = random_covariance(rng, 32)
    assert 0.0 <= frechet_distance(mu1[:1].repeat(32), s, mu1[:1].repeat(32), s) < 1e-10


def test_frechet_distance_of_rank_deficient_covariances():
    """20 samples in 64 dimensions, as with fewer images than Inception's 2048 features: the
    covariances are singular, where pytorch-fid's sqrtm needs an eps offset. The exact value:
    with centred, scaled samples X (s = X^T X), tr sqrt(s1 s2) is the nuclear norm of X1 X2^T."""
    rng = np.random.default_rng(2)
    f1 = rng.normal(size=(20, 64)) @ rng.normal(size=(64, 64)) * 0.3
    f2 = rng.normal(size=(20, 64)) + 0.5
    (mu1, s1), (mu2, s2) = feature_statistics(f1), feature_statistics(f2)
    got = frechet_distance(mu1, s1, mu2, s2)
    x1, x2 = [(f - f.mean(0)) / np.sqrt(len(f) - 1) for f in (f1, f2)]
    nuclear = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum()
    exact = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * nuclear
    assert np.isfinite(got) and got >= 0
    np.testing.assert_allclose(got, exact, rtol=1e-9)
    scipy_value = scipy_frechet_distance(mu1, s1, mu2, s2)
    if np.isfinite(scipy_value):  # scipy, where it is defined
        np.testing.assert_allclose(got, scipy_value, rtol=1e-4)
    assert fid_from_features(f1, f2) == pytest.approx(got, rel=1e-12)
    assert fid((mu1, s1), f2) == pytest.approx(got, rel=1e-12)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="means differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2 has shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="mu1 contains NaN"):
        frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        feature_statistics(np.zeros((1, 4)))


# --- reading torch.save files ------------------------------------------------------------------


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_state_dict_round_trips(torch, tmp_path, zip_format):
    base = torch.randn(6, 8)
    shared = torch.arange(20, dtype=torch.float32)
    saved = collections.OrderedDict(
        float32=torch.randn(3, 4),
        float16=torch.randn(5).half(),
        bfloat16=torch.randn(2, 3).bfloat16(),
        int64=torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4),
        transposed=base.t(),  # non-contiguous: strides (1, 8)
        strided=base[1::2, ::3],  # an offset and steps into the same storage
        shared_head=shared[:5],
        shared_tail=shared[7:].view(13, 1),  # storage offset 7 into the same storage
        scalar=torch.tensor(2.5),
        parameter=torch.nn.Parameter(torch.randn(4)),
        nested=collections.OrderedDict(weight=torch.randn(2, 2)),
        step=7,  # not a tensor: skipped
    )
    path = tmp_path / "weights.pth"
    torch.save(saved, path, _use_new_zipfile_serialization=zip_format)
    loaded = load_torch_state_dict(path)
    expected = {k: v for k, v in saved.items() if isinstance(v, torch.Tensor) and k != "nested"}
    expected["nested.weight"] = saved["nested"]["weight"]
    assert sorted(loaded) == sorted(expected)
    for key, tensor in expected.items():
        reference = tensor.detach()
        if reference.dtype == torch.bfloat16:
            assert str(loaded[key].dtype) == "bfloat16"
            reference = reference.float()
            loaded[key] = loaded[key].astype(np.float32)
        np.testing.assert_array_equal(loaded[key], reference.numpy(), err_msg=key)
        assert loaded[key].shape == tuple(tensor.shape), key
    assert load_weights(path).keys() == loaded.keys()


class _Exploit:
    def __reduce__(self):
        import os

        return os.system, ("echo should never run",)


def test_hostile_pickles_are_refused(tmp_path):
    payload = pickle.dumps({"weight": _Exploit()}, protocol=2)
    zipped = tmp_path / "zipped.pth"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
    legacy = tmp_path / "legacy.pth"
    header = b"".join(pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, {}))
    legacy.write_bytes(header + payload)
    for path in (zipped, legacy):
        with pytest.raises(UnsafePickleError, match="system.*refusing"):
            load_torch_state_dict(path)


def test_files_that_are_not_torch_saves_are_refused(tmp_path):
    old = tmp_path / "old.pth"
    with tarfile.open(old, "w") as tar:
        info = tarfile.TarInfo("pickle")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"abcd"))
    with pytest.raises(ValueError, match=r"old\.pth.*tar archive.*re-save.*safetensors"):
        load_torch_state_dict(old)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a torch.save file"):
        load_torch_state_dict(text)
    with pytest.raises(FileNotFoundError):
        load_torch_state_dict(tmp_path / "absent.pth")


def test_load_weights_reads_safetensors_and_npz(tmp_path):
    tensors = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_file(tensors, tmp_path / "w.safetensors")
    np.savez(tmp_path / "w.npz", **tensors)
    for name in ("w.safetensors", "w.npz"):
        loaded = load_weights(tmp_path / name)
        np.testing.assert_array_equal(loaded["a.weight"], tensors["a.weight"])


# --- the Inception network ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 32), (512, 512), (37, 320)], ids=str)
def test_resize_matches_torch_bilinear(torch, size):
    """Upsampling and downsampling as F.interpolate(bilinear, align_corners=False): no
    antialiasing, so 512 -> 299 samples two pixels per output, not a box average."""
    x = np.random.default_rng(0).uniform(size=(2, *size, 3)).astype(np.float32)
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(299, 299), mode="bilinear"
    )
    ours = np.asarray(resize_bilinear(x))
    np.testing.assert_allclose(ours, reference.numpy().transpose(0, 2, 3, 1), atol=1e-6)


def perturbed_inception_state(torch, torchvision):
    """A torchvision Inception (pytorch-fid's FID layout) with every tensor random and distinct:
    He-scaled convs (activations stay O(1) through the 20-odd layers), BN weights, biases and
    running statistics away from their 1/0 defaults (running_var positive)."""
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(
        num_classes=1008, aux_logits=False, init_weights=True, weights=None
    )
    state = net.state_dict()
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        if value.ndim >= 2:  # conv / fc weights
            value.copy_(torch.randn_like(value) * (2.0 / value[0].numel()) ** 0.5)
        elif key.endswith("running_var"):
            value.copy_(torch.rand_like(value) + 0.5)
        elif key.endswith("weight"):
            value.copy_(1.0 + 0.2 * torch.randn_like(value))
        else:  # BN bias, running_mean, fc bias
            value.copy_(0.1 * torch.randn_like(value))
    return state


@pytest.fixture(scope="module")
def inception_pair(torch, pytorch_fid, tmp_path_factory):
    """(pytorch-fid's InceptionV3([3]) with the perturbed weights, the saved .pth, the state)."""
    import torchvision

    state = perturbed_inception_state(torch, torchvision)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *a, **k: state)
        reference = pytorch_fid.inception.InceptionV3(
            [3], resize_input=True, normalize_input=True, use_fid_inception=True
        ).eval()
    path = tmp_path_factory.mktemp("inception") / FID_WEIGHTS_NAME
    torch.save(state, path)
    return reference, path, {k: v.numpy() for k, v in state.items()}


@pytest.fixture(scope="module")
def ours(inception_pair):
    return load_inception(inception_pair[1], batch_size=2)


def torch_features(torch, reference, images):
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float() / 255.0
    with torch.no_grad():
        return reference(x)[0][:, :, 0, 0].numpy()


@pytest.mark.parametrize(
    "shape", [(3, 32, 32), (2, 64, 64), (2, 320, 320)], ids=["32px", "64px", "320px"]
)
def test_features_match_pytorch_fid(torch, inception_pair, ours, shape):
    """Three 32px images run as a full batch of 2 and a padded batch of 1."""
    n, h, w = shape
    images = np.random.default_rng(h).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    got = ours(images)
    reference = torch_features(torch, inception_pair[0], images)
    assert got.shape == (n, 2048) and got.dtype == np.float32
    error = relative(got, reference)
    print(f"{h}x{w}: max relative error vs pytorch-fid {error:.2e}")
    assert error < RTOL


def test_float_images_in_minus_one_to_one_match_uint8(ours):
    images = np.random.default_rng(5).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    as_float = images.astype(np.float32) / 127.5 - 1.0
    assert relative(ours(as_float), ours(images)) < 1e-5


def test_legacy_format_file_loads_the_same_weights(torch, inception_pair, tmp_path):
    """pytorch-fid's published weights predate torch's zip format."""
    path = tmp_path / "legacy.pth"
    torch.save(torch.load(inception_pair[1]), path, _use_new_zipfile_serialization=False)
    legacy, zipped = load_torch_state_dict(path), load_torch_state_dict(inception_pair[1])
    assert legacy.keys() == zipped.keys()
    for key in zipped:
        np.testing.assert_array_equal(legacy[key], zipped[key], err_msg=key)


def test_wrong_weights_name_the_key_and_file(inception_pair, tmp_path):
    state = dict(inception_pair[2])
    del state["Mixed_6b.branch7x7_2.conv.weight"]
    state["Mixed_7c.branch_pool.bn.bias"] = np.zeros(7, np.float32)
    state["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
    path = tmp_path / "wrong.npz"
    np.savez(path, **state)
    with pytest.raises(ValueError) as error:
        load_inception(path)
    message = str(error.value)
    for expected in (
        "wrong.npz",
        "missing: Mixed_6b.branch7x7_2.conv.weight (128, 128, 1, 7)",
        "misshapen: Mixed_7c.branch_pool.bn.bias (7,), expected (192,)",
        "unexpected: AuxLogits.fc.weight",
    ):
        assert expected in message


def test_missing_weights_say_where_to_get_them(tmp_path):
    for path in (None, "", tmp_path / "absent.pth"):
        with pytest.raises(FileNotFoundError) as error:
            load_inception(path)
        assert "--inception_weights" in str(error.value)
        assert "pt_inception-2015-12-05" in str(error.value)


def test_features_reject_bad_images(ours):
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        ours(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="uint8 or floats"):
        ours(np.zeros((2, 32, 32, 3), np.int32))
    assert isinstance(ours, InceptionFeatures)
    assert ours(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 2048)
