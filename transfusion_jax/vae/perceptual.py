"""The LPIPS perceptual distance (Zhang et al., 2018) on VGG16 features, for VAE training.

No weights ship with the project and none are downloaded: `loss.perceptual_path` names a
safetensors file the user supplies, holding torchvision's VGG16 `features.N.weight/bias` tensors
(e.g. converted from `torchvision.models.vgg16(weights="IMAGENET1K_V1")`) and, for LPIPS proper,
the learned per-channel weights `lin0.model.1.weight` ... `lin4.model.1.weight` of the `lpips`
package. Without the `lin` tensors every channel weighs the same.

  d(x, y) = sum over the five taps relu1_2 ... relu5_3 of
            mean over positions of sum_c w_c (f_x / |f_x| - f_y / |f_y|)_c^2
with images in [-1, 1] shifted and scaled as LPIPS does first.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from transfusion_jax.layers import sharded
from transfusion_jax.paths import as_path, local_copy

# (out channels or "M" for a 2x2 max pool), as torchvision's vgg16().features.
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # features indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)  # LPIPS' ScalingLayer
SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def _feature_index(i: int) -> list[int]:
    """torchvision `features` indices of the convs (each conv is followed by a ReLU)."""
    indices, index = [], 0
    for item in VGG16:
        if item == "M":
            index += 1
        else:
            indices.append(index)
            index += 2
    return indices[i]


class LPIPS(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.convs = nnx.List()
        c_in = 3
        for item in VGG16:
            if item == "M":
                continue
            self.convs.append(
                nnx.Conv(
                    c_in,
                    item,
                    kernel_size=(3, 3),
                    padding=((1, 1), (1, 1)),
                    kernel_init=sharded(nnx.initializers.lecun_normal(), None, None, None, None),
                    bias_init=sharded(nnx.initializers.zeros_init(), None),
                    rngs=rngs,
                )
            )
            c_in = item
        widths = [64, 128, 256, 512, 512]
        self.lins = nnx.List([nnx.Param(jnp.ones((w,), jnp.float32)) for w in widths])

    def features(self, x: jax.Array) -> list[jax.Array]:
        h, taps, conv, index = (x - SHIFT) / SCALE, [], 0, 0
        for item in VGG16:
            if item == "M":
                n, hh, ww, c = h.shape
                h = h.reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
                index += 1
                continue
            h = jax.nn.relu(self.convs[conv](h))
            if index + 1 in TAPS:
                taps.append(h)
            conv, index = conv + 1, index + 2
        return taps

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """The distance per image, [N], of images in [-1, 1]."""
        total = 0.0
        for fx, fy, w in zip(self.features(x), self.features(y), self.lins, strict=True):
            nx = fx / (jnp.sqrt(jnp.sum(fx**2, axis=-1, keepdims=True)) + 1e-10)
            ny = fy / (jnp.sqrt(jnp.sum(fy**2, axis=-1, keepdims=True)) + 1e-10)
            total = total + jnp.mean(jnp.sum(w[...] * (nx - ny) ** 2, axis=-1), axis=(1, 2))
        return total


def load_lpips(path) -> LPIPS:
    """LPIPS with the VGG16 (and, if present, lin) weights of a safetensors file; errors name the
    file and the missing tensors."""
    path = as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config field loss.perceptual_path: {path} does not exist")
    try:
        with local_copy(path) as local:
            tensors = load_file(str(local))
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise ValueError(
            f"config field loss.perceptual_path: {path} is not safetensors ({e})"
        ) from e
    model = nnx.eval_shape(lambda: LPIPS(nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    missing = []
    for i in range(len(pure["convs"])):
        name = f"features.{_feature_index(i)}"
        weight, bias = tensors.get(f"{name}.weight"), tensors.get(f"{name}.bias")
        if weight is None or bias is None:
            missing.append(name)
            continue
        pure["convs"][i]["kernel"] = np.transpose(weight, (2, 3, 1, 0)).astype(np.float32)
        pure["convs"][i]["bias"] = bias.astype(np.float32)
    if missing:
        raise ValueError(
            f"config field loss.perceptual_path: {path} lacks torchvision VGG16 tensors "
            f"{missing[:3]} (expected features.N.weight / features.N.bias)"
        )
    for i in range(len(pure["lins"])):
        lin = tensors.get(f"lin{i}.model.1.weight")
        width = pure["lins"][i].shape[0]
        pure["lins"][i] = np.ones(width, np.float32) if lin is None else lin.reshape(width)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    return nnx.merge(graphdef, state)
