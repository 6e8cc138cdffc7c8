"""The device mesh and the one table that maps logical weight axes to mesh axes.

Mesh axes: `data` (pure data parallelism: weights replicated), `fsdp` (data parallelism with
weights, gradients and optimizer state sharded, ZeRO-3 style) and `tensor` (Megatron-style model
parallelism over heads and the MLP width). The batch is split over data x fsdp.

A weight dimension is sharded only when the mesh axis size divides it, and a mesh axis is used at
most once per weight; anything else stays replicated, so every config runs on every mesh.
"""

import functools
import logging
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axis (None = replicated). Unknown names are an error, so a new weight
# cannot silently fall back to replication.
RULES = {
    "layers": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "patch": None,
    "time": None,
    "time_embed": None,
    "time_embed_out": None,
    "conv_in": None,
    "conv_out": "fsdp",
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices."""
    devices = jax.devices() if devices is None else list(devices)
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError(f"config fields mesh.data/fsdp/tensor: at most one may be -1, got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(
                f"config fields mesh.data/fsdp/tensor: {shape} leaves -1 no whole share of "
                f"{len(devices)} devices ({known} does not divide it); pick sizes that do"
            )
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"config fields mesh.data/fsdp/tensor: data={shape[0]} fsdp={shape[1]} "
            f"tensor={shape[2]} needs "
            f"{math.prod(shape)} devices, found {len(devices)}; set one axis to -1"
        )
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_from_config(cfg, devices=None) -> Mesh:
    return make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices)


def logical_to_mesh(names, shape, mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of one weight from its logical axis names and shape."""
    used, spec = set(), []
    for name, size in zip(names, shape, strict=True):
        if name is not None and name not in RULES:
            raise KeyError(f"logical axis {name!r} has no entry in sharding.RULES")
        axis = RULES.get(name) if name is not None else None
        if axis is None or axis in used or size % mesh.shape[axis] != 0:
            if axis is not None and name in WHOLE and size % mesh.shape[axis]:
                _warn_unsplit(name, size, axis, mesh.shape[axis])
            spec.append(None)
            continue
        used.add(axis)
        spec.append(axis)
    return PartitionSpec(*spec)


# Axes that are only ever split whole: a mesh axis that does not divide them leaves them whole.
WHOLE = ("heads", "kv_heads")


@functools.cache
def _warn_unsplit(name: str, size: int, axis: str, axis_size: int) -> None:
    logging.getLogger(__name__).warning(
        "%d %s do not divide over mesh.%s=%d: those weights stay replicated on that axis (set "
        "mesh.%s to a divisor of %d to split them)",
        size,
        name,
        axis,
        axis_size,
        axis,
        size,
    )


def param_shardings(logical_specs, abstract_params, mesh: Mesh):
    """NamedShardings for a params tree, given the tree of logical PartitionSpecs."""
    return jax.tree.map(
        lambda names, x: NamedSharding(mesh, logical_to_mesh(tuple(names), x.shape, mesh)),
        logical_specs,
        abstract_params,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp, everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def constrain_rows(x: jax.Array) -> jax.Array:
    """x with its leading (row) axis split over the batch axes of the context mesh, the rest
    replicated: the activation layout at block boundaries. Without a mesh context, x."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    if x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(axes))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch, mesh: Mesh):
    """Global jax arrays from this process's rows (all rows when there is one process)."""
    sharding = batch_sharding(mesh)

    def to_global(x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(to_global, local_batch)
