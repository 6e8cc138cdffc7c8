"""Sampling on a mesh of the 8 simulated devices: only the weights are restored (an Orbax
partial restore, straight into their shards), the KV cache is split by heads and rows, and the
outputs are those of one device."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from tests.helpers import ROOT, flat_attention_layout
from transfusion_jax import Pipeline
from transfusion_jax import sample as sample_cli
from transfusion_jax.checkpoint import Checkpointer
from transfusion_jax.config import load_config
from transfusion_jax.inference import auto_mesh_shape, load_trained
from transfusion_jax.sharding import make_mesh
from transfusion_jax.train_step import TrainProgram, bytes_per_device

MESH = (1, 2, 4)  # data, fsdp, tensor


def small_config(kv_heads: int):
    cfg = load_config(str(ROOT / "configs" / "tiny.py"))
    cfg.model.update(d_model=64, depth=2, num_heads=4, num_kv_heads=kv_heads)
    cfg.image.update(latent_size=8, patch_size=4)  # pixel space: 4 patches of 4x4
    cfg.patch.kind = "linear"
    cfg.data.update(image_size=8, seq_len=64)
    cfg.train.ema_decay = 0.9
    cfg.mesh.fsdp = 1
    return cfg


def one_device():
    return make_mesh(1, 1, 1, jax.devices()[:1])


def perturbed_state(cfg, transform=None):
    """A fresh state whose weights and EMA weights are nudged apart by random noise (so the
    outputs depend on every weight, and on which set was restored)."""
    state = TrainProgram(cfg, one_device(), frozen_weights=False).init_state(0)
    leaves, tree = jax.tree.flatten((state.params, state.ema_params))
    rng = np.random.default_rng(0)
    noisy = [x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype) for x in leaves]
    params, ema = jax.tree.unflatten(tree, noisy)
    state = state.replace(params=params, ema_params=ema)
    return state if transform is None else jax.tree_util.tree_map_with_path(transform, state)


def save(workdir, cfg, state, step: int = 1):
    checkpoints = Checkpointer(workdir / "checkpoints", keep=None)
    checkpoints.save(step, state, {}, json.loads(cfg.to_json_best_effort()))
    checkpoints.close()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kv heads -> (workdir, state) of a checkpointed model, made when first asked for."""
    runs = {}

    def get(kv_heads: int):
        if kv_heads not in runs:
            cfg = small_config(kv_heads)
            state = perturbed_state(cfg)
            workdir = tmp_path_factory.mktemp(f"kv{kv_heads}")
            save(workdir, cfg, state)
            runs[kv_heads] = workdir, state
        return runs[kv_heads]

    return get


# 4 KV heads split over tensor=4; 2 KV heads stay whole (replicated on tensor).
KV_HEADS = pytest.mark.parametrize("kv_heads", [4, 2], ids=["kv_heads_split", "kv_heads_whole"])


def shard_shapes(x):
    return {tuple(s.data.shape) for s in x.addressable_shards}


@pytest.mark.slow  # 20-30 s a case on 2 cores: two compiles of every generation function
@KV_HEADS
def test_sharded_sampling_equals_one_device(saved, kv_heads):
    workdir, state = saved(kv_heads)
    one = Pipeline.from_workdir(workdir, ema=True)
    many = Pipeline.from_workdir(workdir, ema=True, mesh=make_mesh(*MESH))
    assert many.generator.mesh is not None and one.generator.mesh is None
    params = many.generator.params
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(params), state.ema_params)
    attn = params["transformer"]["blocks"]["attn"]
    assert "tensor" in attn["q"]["kernel"][...].sharding.spec  # 4 query heads over tensor=4
    k_spec = attn["k"]["kernel"][...].sharding.spec
    assert ("tensor" in k_spec) == (kv_heads % MESH[2] == 0)

    # The cache: heads over tensor when they divide, rows over fsdp when they divide.
    bos = many.tokenizer.special.bos
    depth, hd = 2, 16
    ctx = many.generator.start([[bos, 70], [bos, 71, 72]], 64)
    ctx = many.generator.add_tokens(ctx, [[73], [74]])
    heads_per_device = kv_heads // MESH[2] if kv_heads % MESH[2] == 0 else kv_heads
    expected = {(depth, 1, 64, heads_per_device, hd)}
    assert shard_shapes(ctx.k) == shard_shapes(ctx.v) == expected
    alone = many.generator.start([[bos, 70]], 64)  # one row: not split over fsdp=2
    assert shard_shapes(alone.k) == {(depth, 1, 64, heads_per_device, hd)}

    if kv_heads % MESH[2]:
        return  # whole heads differ only in the cache spec checked above; outputs compared once
    # Text -> image, with guidance: the same tokens, images equal to float rounding.
    prompts = [one._prompt("a small red circle"), one._prompt("")]
    options = one.options(steps=3, cfg_scale=2.0, max_new_tokens=1)
    a = one.generator.generate(prompts, jax.random.key(1), options, force_image=True)
    b = many.generator.generate(prompts, jax.random.key(1), options, force_image=True)
    assert a.tokens == b.tokens
    for row_a, row_b in zip(a.images, b.images, strict=True):
        np.testing.assert_allclose(row_a[0], row_b[0], atol=1e-5, rtol=1e-5)
    # Captioning those images (two rows over fsdp), and a text continuation of one row (rows
    # replicated); sampled, not greedy.
    drawn = np.stack([row[0] for row in a.images])
    assert one.caption(drawn, max_new_tokens=6) == many.caption(drawn, max_new_tokens=6)
    options = one.options(max_new_tokens=8, max_images=0, temperature=1.0, top_k=50)
    a = one.generator.generate([one._prompt("a")], jax.random.key(2), options)
    b = many.generator.generate([one._prompt("a")], jax.random.key(2), options)
    assert a.tokens == b.tokens and len(a.tokens[0]) == 8


@KV_HEADS
def test_only_the_weights_asked_for_are_restored(saved, kv_heads):
    """Orbax reads the params or the EMA params, nothing else: a quarter of an Adam + EMA state
    (measured in bytes placed on the devices)."""
    workdir, state = saved(kv_heads)
    cfg = small_config(kv_heads)
    program = TrainProgram(cfg, make_mesh(*MESH), frozen_weights=False)
    checkpoints = Checkpointer(workdir / "checkpoints", keep=None, read_only=True)
    try:
        abstract = program.abstract_state()
        params = checkpoints.restore_params(1, abstract.params)
        ema = checkpoints.restore_params(1, abstract.params, ema=True)
        full, _ = checkpoints.restore(1, abstract)  # the same Checkpointer: both handlers
    finally:
        checkpoints.close()
    jax.tree.map(np.testing.assert_array_equal, params, state.params)
    jax.tree.map(np.testing.assert_array_equal, ema, state.ema_params)
    read = sum(bytes_per_device(params).values())
    everything = sum(bytes_per_device(full).values())
    assert everything > 3.9 * read  # params, Adam's two moments, EMA (and a few scalars)
    assert read == sum(
        bytes_per_device(jax.device_put(state.params, program.param_shardings)).values()
    )


def test_params_only_restore_migrates_flat_attention_weights(tmp_path):
    """Checkpoints of earlier versions hold q/k/v/o as flat [embed, heads * head_dim]: the
    params-only path reads them in that shape and gives them their heads axis, sharded."""
    cfg = small_config(4)

    state = perturbed_state(cfg)
    save(tmp_path, cfg, jax.tree_util.tree_map_with_path(flat_attention_layout, state))
    model, _, step = load_trained(tmp_path, use_ema=True, mesh=make_mesh(*MESH))
    params = model.transformer.blocks.attn.q.kernel[...]
    assert step == 1 and params.ndim == 4 and "tensor" in params.sharding.spec
    restored = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, restored, state.ema_params)
    # The whole state too, by a Checkpointer that saved nothing (a resume in a new process).
    program = TrainProgram(cfg, make_mesh(*MESH), frozen_weights=False)
    checkpoints = Checkpointer(tmp_path / "checkpoints", keep=None, read_only=True)
    try:
        whole, _ = checkpoints.restore(1, program.abstract_state())
    finally:
        checkpoints.close()
    jax.tree.map(np.testing.assert_array_equal, whole, state)


def test_the_default_mesh_splits_whole_kv_heads():
    assert auto_mesh_shape(8, 4) == (1, 2, 4)
    assert auto_mesh_shape(8, 2) == (1, 4, 2)
    assert auto_mesh_shape(8, 32) == (1, 1, 8)
    assert auto_mesh_shape(8, 3) == (1, 8, 1)
    assert auto_mesh_shape(1, 8) == (1, 1, 1)


@pytest.mark.parametrize(
    "value, message",
    [
        ("3,1,1", "--mesh 3,1,1: there are 8 local devices; give DATA,FSDP,TENSOR whose product"),
        ("1,3,-1", "--mesh 1,3,-1: there are 8 local devices"),
        ("2,2", "--mesh 2,2: not auto or three sizes"),
        ("1,x,8", "--mesh 1,x,8: not auto or three sizes"),
        ("1,-1,-1", "--mesh 1,-1,-1: not auto or three sizes"),
        ("1,0,8", "--mesh 1,0,8: not auto or three sizes"),
    ],
)
def test_bad_mesh_flags_are_refused_before_the_model_loads(
    saved, monkeypatch, capsys, value, message
):
    workdir, _ = saved(2)

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(sample_cli.Pipeline, "from_workdir", must_not_load)
    with pytest.raises(SystemExit) as exit_info:
        sample_cli.main(
            ["--workdir", str(workdir), "--text", "a", "--max_new_tokens", "3", "--mesh", value]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len([line for line in err.splitlines() if "error:" in line]) == 1


def test_the_cli_samples_on_the_mesh_it_is_given(saved, monkeypatch, capsys):
    """--mesh reaches the pipeline (auto: 2 KV heads make tensor=2, fsdp=4), and the text is
    the same on either mesh."""
    kv_heads = 2
    workdir, _ = saved(kv_heads)
    meshes = []
    original = Pipeline.from_workdir.__func__

    def spy(cls, *args, mesh=None, **kwargs):
        meshes.append(mesh)
        return original(cls, *args, mesh=mesh, **kwargs)

    monkeypatch.setattr(sample_cli.Pipeline, "from_workdir", classmethod(spy))
    args = ["--workdir", str(workdir), "--text", "a", "--max_new_tokens", "3"]
    outputs = []
    for extra in ([], ["--mesh", "1,-1,1"]):
        sample_cli.main(args + extra)
        outputs.append(capsys.readouterr().out)
    auto = dict(zip(("data", "fsdp", "tensor"), auto_mesh_shape(8, kv_heads), strict=True))
    assert dict(meshes[0].shape) == auto
    assert dict(meshes[1].shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert outputs[0] == outputs[1]  # the same continuation on both meshes
