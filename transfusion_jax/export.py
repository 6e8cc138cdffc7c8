"""A trained model's parameters in one safetensors file, for use outside this package.

  python -m transfusion_jax.export --workdir DIR --out model.safetensors [--ema] [--step N]

Tensors are named by their path in the parameter tree, e.g. "transformer/blocks/attn/q/kernel"
(the scanned blocks keep the layer axis first); the file's metadata holds the resolved config as
JSON ("config"), the step and which weights ("params" or "ema"). `load_exported(FILE)`, and so
`inference.load_trained(FILE)` and `Pipeline.from_workdir(FILE)`, read it back.
"""

import argparse
import json
import sys

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save

from transfusion_jax.config import base_config
from transfusion_jax.paths import as_path, local_copy, write_atomically
from transfusion_jax.sharding import make_mesh
from transfusion_jax.train_step import TrainProgram

FORMAT = "transfusion_jax"


def tensor_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def export(model, cfg, step: int, out, weights: str = "params") -> dict:
    """Writes `model`'s parameters to `out`; returns the metadata written."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors = {
        tensor_name(path): np.asarray(jax.device_get(leaf))
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    metadata = {
        "format": FORMAT,
        "config": cfg.to_json_best_effort(),
        "step": str(step),
        "weights": weights,
    }
    # The file's bytes, built in memory and written whole: an interrupted export leaves the
    # previous file (locally, a rename) and an object store shows only a complete upload.
    as_path(out).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, save(tensors, metadata=metadata))
    return metadata


def is_export(path) -> bool:
    """Whether `path` names an exported file rather than a training run's directory."""
    path = as_path(path)
    return path.suffix == ".safetensors" and path.is_file()


def exported_config(path) -> dict:
    """The config an exported file was written with (its metadata only, no tensors)."""
    path = as_path(path)
    with local_copy(path) as local, safe_open(str(local), framework="numpy") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise ValueError(f"{path}: not a transfusion_jax export (no config in its metadata)")
    return json.loads(metadata["config"])


def load_exported(path, mesh=None):
    """(model, config, step) from an exported file, placed on `mesh` (default: one device).
    Every tensor must be there with its shape; a missing or misshapen one is named."""
    path = as_path(path)
    cfg = base_config()  # keys added since the export keep their defaults
    cfg.update(exported_config(path))
    with local_copy(path) as local, safe_open(str(local), framework="numpy") as f:
        metadata = f.metadata()
        mesh = mesh or make_mesh(1, 1, 1, jax.local_devices()[:1])
        program = TrainProgram(cfg, mesh, frozen_weights=False)
        abstract = program.abstract_state().params
        leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
        arrays = []
        for key_path, spec in leaves:
            name = tensor_name(key_path)
            if name not in f.keys():
                raise ValueError(f"{path}: tensor {name!r} is missing")
            array = f.get_tensor(name)
            if "/attn/" in f"/{name}/" and array.size == spec.size:
                array = array.reshape(spec.shape)  # earlier exports: flat [embed, heads * dim]
            if array.shape != spec.shape:
                raise ValueError(
                    f"{path}: tensor {name!r} has shape {array.shape}, the config says {spec.shape}"
                )
            arrays.append(jax.device_put(array.astype(spec.dtype), spec.sharding))
    params = jax.tree_util.tree_unflatten(treedef, arrays)
    return nnx.merge(program.graphdef, params), program.cfg, int(metadata.get("step", 0))


def main(argv=None):
    from transfusion_jax.inference import load_trained

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a training run's directory")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights")
    parser.add_argument("--step", type=int, default=None, help="default: the newest checkpoint")
    args = parser.parse_args(argv)
    try:
        model, cfg, step = load_trained(args.workdir, use_ema=args.ema, step=args.step)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    export(model, cfg, step, args.out, "ema" if args.ema else "params")
    size = as_path(args.out).stat().length / 2**20
    print(f"wrote {args.out} ({size:.1f} MiB, step {step})", file=sys.stderr)


if __name__ == "__main__":
    main()
