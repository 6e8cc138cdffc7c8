"""The FID Inception network (pytorch-fid's `FIDInceptionV3`) in Flax NNX, up to pool3.

FID is only comparable across papers with one particular network: the TensorFlow Inception graph
of 2015-12-05 that the original FID code used, which pytorch-fid ported to PyTorch. That port is
torchvision's Inception3 (1008 classes, no aux head) with four patches: the Mixed_5*/6b-e/7b
blocks average-pool without counting the zero padding, and Mixed_7c max-pools. This module
rebuilds that network layer for layer, NHWC, with parameters named exactly as in pytorch-fid's
state dict (`Mixed_5b.branch1x1.bn.running_mean`...), so `load_inception` maps the file onto it
by name; tests/test_fid.py checks the features against pytorch-fid itself.

The weights are pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, passed by path: this code
never downloads anything.
"""

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from transfusion_jax import paths
from transfusion_jax.evaluation.torch_weights import load_weights
from transfusion_jax.weight_files import mismatch_report

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
)
FEATURES = 2048  # pool3 width
INPUT_SIZE = 299  # pytorch-fid resizes every image to 299 x 299
BN_EPS = 1e-3  # torchvision's BasicConv2d
# Keys of the weights file the pool3 features do not use: the classifier and BN step counters.
UNUSED_KEYS = ("fc.weight", "fc.bias")
UNUSED_SUFFIX = ".num_batches_tracked"
MISSING_WEIGHTS = (
    "FID needs --inception_weights: the path of pytorch-fid's Inception weights {name}, "
    "downloaded once from {url} (nothing is downloaded automatically)"
)
_HIGHEST = jax.lax.Precision.HIGHEST  # exact float32 convolutions (no TF32/bf16 passes on GPU)


def missing_weights_message(path=None) -> str:
    """What to do when the Inception weights are not at `path` (None: no path given)."""
    given = "no path was given" if not path else f"{path} does not exist"
    return f"{MISSING_WEIGHTS.format(name=FID_WEIGHTS_NAME, url=FID_WEIGHTS_URL)} ({given})"


def check_weights(path) -> epath.Path:
    """The weights file's path (local or a URL), or FileNotFoundError saying where the weights
    come from; cheap, so a run can check before it trains for hours."""
    if not path or not paths.as_path(path).is_file():
        raise FileNotFoundError(missing_weights_message(path))
    return paths.as_path(path)


class Conv2d(nnx.Module):
    """torch.nn.Conv2d without bias; the kernel is stored HWIO (torch's OIHW transposed)."""

    def __init__(self, c_in, c_out, kernel, stride, padding, *, rngs: nnx.Rngs):
        kh, kw = kernel
        fan_in = c_in * kh * kw
        init = jax.random.normal(rngs.params(), (kh, kw, c_in, c_out)) / np.sqrt(fan_in)
        self.weight = nnx.Param(init)
        self.stride = stride
        self.padding = ((padding[0], padding[0]), (padding[1], padding[1]))

    def __call__(self, x):
        return jax.lax.conv_general_dilated(
            x,
            self.weight[...],
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=_HIGHEST,
        )


class BatchNorm(nnx.Module):
    """torch.nn.BatchNorm2d in eval mode: the running statistics, never updated."""

    def __init__(self, c):
        self.weight = nnx.Param(jnp.ones(c))
        self.bias = nnx.Param(jnp.zeros(c))
        self.running_mean = nnx.BatchStat(jnp.zeros(c))
        self.running_var = nnx.BatchStat(jnp.ones(c))

    def __call__(self, x):
        scale = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + BN_EPS)
        return (x - self.running_mean[...]) * scale + self.bias[...]


class BasicConv2d(nnx.Module):
    """torchvision's conv -> BatchNorm(eps=1e-3) -> ReLU."""

    def __init__(self, c_in, c_out, kernel, stride=1, padding=0, *, rngs: nnx.Rngs):
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
        self.conv = Conv2d(c_in, c_out, pair(kernel), stride, pair(padding), rngs=rngs)
        self.bn = BatchNorm(c_out)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x, stride: int, padding: int = 0):
    """3x3 max pool; torch pads with -inf, so padding never wins the max."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad
    )


def avg_pool_excluding_padding(x):
    """3x3 stride-1 average pool over the in-image pixels only (count_include_pad=False, as
    TensorFlow pools): border windows divide by 6 or 4, not 9."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pad)
    return total / count


class InceptionA(nnx.Module):
    """Mixed_5b/5c/5d (pytorch-fid's FIDInceptionA)."""

    def __init__(self, c_in, pool_features, *, rngs):
        self.branch1x1 = BasicConv2d(c_in, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(avg_pool_excluding_padding(x))
        return jnp.concatenate([self.branch1x1(x), b5, b3, pool], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a (torchvision's InceptionB): 35x35 -> 17x17."""

    def __init__(self, c_in, *, rngs):
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, max_pool(x, stride=2)], axis=-1)


class InceptionC(nnx.Module):
    """Mixed_6b..6e (pytorch-fid's FIDInceptionC): factorised 7x7 convolutions."""

    def __init__(self, c_in, c7, *, rngs):
        self.branch1x1 = BasicConv2d(c_in, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(c_in, 192, 1, rngs=rngs)

    def __call__(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            d = conv(d)
        pool = self.branch_pool(avg_pool_excluding_padding(x))
        return jnp.concatenate([self.branch1x1(x), b7, d, pool], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a (torchvision's InceptionD): 17x17 -> 8x8."""

    def __init__(self, c_in, *, rngs):
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3):
            b7 = conv(b7)
        b7 = self.branch7x7x3_4(b7)
        return jnp.concatenate([b3, b7, max_pool(x, stride=2)], axis=-1)


class InceptionE(nnx.Module):
    """Mixed_7b (FIDInceptionE_1: average pool without padding) and Mixed_7c (FIDInceptionE_2:
    max pool, a quirk of the TensorFlow graph that FID scores depend on)."""

    def __init__(self, c_in, *, max_pool_branch: bool, rngs):
        self.branch1x1 = BasicConv2d(c_in, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(c_in, 192, 1, rngs=rngs)
        self.max_pool_branch = max_pool_branch

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = jnp.concatenate([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], axis=-1)
        if self.max_pool_branch:
            pooled = max_pool(x, stride=1, padding=1)
        else:
            pooled = avg_pool_excluding_padding(x)
        return jnp.concatenate([self.branch1x1(x), b3, d, self.branch_pool(pooled)], axis=-1)


class FIDInceptionV3(nnx.Module):
    """Images [N, 299, 299, 3] in [-1, 1] -> pool3 features [N, 2048] (float32)."""

    def __init__(self, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, pool_features=32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, pool_features=64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, pool_features=64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, c7=128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, c7=160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, c7=160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, c7=192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, max_pool_branch=False, rngs=rngs)
        self.Mixed_7c = InceptionE(2048, max_pool_branch=True, rngs=rngs)

    def __call__(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool(x, stride=2)
        x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a):
            x = block(x)
        for block in (self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = block(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return jnp.mean(x, axis=(1, 2))


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's bilinear resize along one axis (align_corners=False, no
    antialias): output i samples input (i + 0.5) * in / out - 0.5, clamped at 0, between its two
    neighbours, so downsampling skips pixels, exactly as pytorch-fid's F.interpolate.

    The position is a float32 fused multiply-add (one rounding), as torch's compiled kernels
    compute it; separate roundings would move the weights by up to ~1e-5 at 320px and more.
    """
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    centres = np.arange(out_size, dtype=np.float64) + 0.5
    # float32 * float32 is exact in float64, so one rounding to float32 after the add is an FMA.
    source = (np.float64(scale) * centres - 0.5).astype(f32)
    source = np.maximum(source, f32(0))
    left = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    right = np.minimum(left + 1, in_size - 1)
    frac = np.clip(source - left.astype(f32), f32(0), f32(1))
    weights = np.zeros((out_size, in_size), f32)
    np.add.at(weights, (np.arange(out_size), left), f32(1) - frac)
    np.add.at(weights, (np.arange(out_size), right), frac)
    return weights


def resize_bilinear(x, size: int = INPUT_SIZE):
    """Images [N, H, W, C] resized to [N, size, size, C] as torch's F.interpolate(mode='bilinear',
    align_corners=False) does: separable, two input pixels per output pixel per axis."""
    _, h, w, _ = x.shape
    if h != size:
        x = jnp.einsum("oh,nhwc->nowc", bilinear_matrix(h, size), x, precision=_HIGHEST)
    if w != size:
        x = jnp.einsum("ow,nhwc->nhoc", bilinear_matrix(w, size), x, precision=_HIGHEST)
    return x


def preprocess(images):
    """uint8 images [N, H, W, 3], or floats in [-1, 1] (clipped, as saving them would), to the
    network's input: pytorch-fid's resize of [0, 1] images to 299x299, then 2x - 1."""
    if images.dtype == jnp.uint8:
        x = images.astype(jnp.float32) / 255.0
    else:
        x = (jnp.clip(images.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0
    return 2.0 * resize_bilinear(x) - 1.0


class InceptionFeatures:
    """pool3 features [N, 2048] (numpy float32) of images [N, H, W, 3] (uint8, or floats in
    [-1, 1]), computed in fixed-size batches so that a stream of batches compiles once."""

    def __init__(self, network: FIDInceptionV3, batch_size: int = 50):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        graphdef, self._state = nnx.split(network)
        self.batch_size = batch_size

        @jax.jit
        def features(state, images):
            return nnx.merge(graphdef, state)(preprocess(images))

        self._features = features

    def __call__(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [N, H, W, 3], got shape {images.shape}")
        if images.dtype != np.uint8:
            if not np.issubdtype(images.dtype, np.floating):
                raise ValueError(f"images must be uint8 or floats in [-1, 1], got {images.dtype}")
            images = images.astype(np.float32)
        n = images.shape[0]
        if n == 0:
            return np.zeros((0, FEATURES), np.float32)
        size = min(self.batch_size, n)  # a smaller call compiles once for its own size
        outputs = []
        for start in range(0, n, size):
            batch = images[start : start + size]
            real = batch.shape[0]
            if real < size:  # pad the last batch: one shape, one compilation
                padding = np.zeros((size - real, *batch.shape[1:]), batch.dtype)
                batch = np.concatenate([batch, padding])
            outputs.append((self._features(self._state, batch), real))
        return np.concatenate([np.asarray(out)[:real] for out, real in outputs])


def _fill(shapes: dict, tensors: dict, file) -> dict:
    """Our parameters (float32, our layouts) from the file's tensors, or a ValueError naming the
    missing, misshapen and unexpected keys and the file."""
    used, missing, misshapen = set(), [], []

    def load(path, leaf):
        key = ".".join(str(getattr(k, "key", k)) for k in path)
        torch_shape = (*leaf.shape[3:1:-1], *leaf.shape[:2]) if leaf.ndim == 4 else leaf.shape
        if key not in tensors:
            missing.append(f"{key} {tuple(torch_shape)}")
            return None
        used.add(key)
        value = np.asarray(tensors[key])
        if value.shape != tuple(torch_shape):
            misshapen.append(f"{key} {value.shape}, expected {tuple(torch_shape)}")
            return None
        if value.ndim == 4:  # conv OIHW -> HWIO
            value = value.transpose(2, 3, 1, 0)
        return jnp.asarray(value, jnp.float32)

    filled = jax.tree_util.tree_map_with_path(load, shapes)
    unexpected = [
        f"{k} {tuple(np.shape(v))}"
        for k, v in tensors.items()
        if k not in used and k not in UNUSED_KEYS and not k.endswith(UNUSED_SUFFIX)
    ]
    problems = mismatch_report(
        {"missing": missing, "misshapen": misshapen, "unexpected": unexpected}
    )
    if problems:
        raise ValueError(
            f"{file}: not the FID Inception weights ({problems}); expected pytorch-fid's "
            f"{FID_WEIGHTS_NAME}"
        )
    return filled


def load_inception(path, *, batch_size: int = 50) -> InceptionFeatures:
    """The FID Inception network with the weights at `path` (pytorch-fid's .pth, or the same
    tensors as .safetensors / .npz), ready to compute pool3 features."""
    path = check_weights(path)
    tensors = load_weights(path)
    abstract = nnx.eval_shape(lambda: FIDInceptionV3(nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, _fill(nnx.to_pure_dict(state), tensors, path))
    return InceptionFeatures(nnx.merge(graphdef, state), batch_size)
