"""Sharded training on 8 simulated CPU devices: real sharding, mesh-independence of the loss curve,
exact kill-and-resume, resume onto another mesh, non-finite losses, and the optimizer's rules."""

import json
import time

import jax
import numpy as np
import pytest
from flax import nnx

from tests.helpers import SPECIAL, flat_attention_layout, tiny_config
from transfusion_jax import data as data_module
from transfusion_jax import train as train_module
from transfusion_jax.batch import build_batch, image_first_document
from transfusion_jax.checkpoint import Checkpointer
from transfusion_jax.data.synthetic import SyntheticSource
from transfusion_jax.loss import loss_terms
from transfusion_jax.optimizer import decay_mask
from transfusion_jax.sharding import make_mesh
from transfusion_jax.train import NonFiniteLossError, train
from transfusion_jax.train_step import TrainProgram, bytes_per_device


def small_config(**mesh):
    cfg = tiny_config(model__d_model=64, model__depth=2, image__latent_size=8, data__seq_len=64)
    cfg.train.update(batch_size=8, num_steps=6, log_every=1, checkpoint_every=3)
    cfg.optimizer.update(warmup_steps=2)
    cfg.mesh.update({"data": 1, "fsdp": -1, "tensor": 1, **mesh})
    cfg.data.source = "synthetic"
    return cfg


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def final_state(workdir, cfg):
    program = TrainProgram(cfg, make_mesh(1, 1, 1, jax.devices()[:1]))
    checkpoints = Checkpointer(workdir / "checkpoints", keep=3)
    state, _ = checkpoints.restore(checkpoints.latest_step(), program.abstract_state())
    checkpoints.close()
    return state, program


def final_params(workdir, cfg):
    return jax.tree.map(np.asarray, final_state(workdir, cfg)[0].params)


def test_weights_are_sharded_over_fsdp_and_tensor():
    cfg = tiny_config(model__d_model=256, model__num_heads=4)
    program = TrainProgram(cfg, make_mesh(2, 2, 2))
    state = program.init_state(0)
    mlp = state.params["transformer"]["blocks"]["mlp"]["up"]["kernel"]  # [layers, embed, mlp]
    per_device = bytes_per_device(mlp)
    assert len(per_device) == 8
    assert all(b == mlp.nbytes // 4 for b in per_device.values())  # embed/fsdp, mlp/tensor
    totals = bytes_per_device(state.params)
    total = sum(x.nbytes for x in jax.tree.leaves(state.params))
    assert max(totals.values()) < 0.3 * total  # ~1/4 plus small replicated vectors
    # Adam's moments follow the weights.
    moments = bytes_per_device(state.opt_state)
    assert max(moments.values()) < 0.3 * sum(x.nbytes for x in jax.tree.leaves(state.opt_state))


def test_loss_curve_on_a_2x2x2_mesh_equals_one_device(tmp_path):
    one = small_config(fsdp=1)
    train(one, tmp_path / "one", devices=jax.devices()[:1])
    mesh = small_config(data=2, fsdp=2, tensor=2)
    train(mesh, tmp_path / "mesh")
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "mesh")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for key in ("loss", "lm_loss", "diffusion_loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in a], [r[key] for r in b], rtol=2e-4)
    assert a[-1]["loss"] < a[0]["loss"]


def test_kill_and_resume_is_exact(tmp_path):
    cfg = small_config()
    train(cfg, tmp_path / "straight")
    train(cfg, tmp_path / "resumed", stop_at_step=3)
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [1, 2, 3]
    train(cfg, tmp_path / "resumed")
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    drop_timing = lambda r: {k: v for k, v in r.items() if k not in ("tokens_per_s", "step_s")}
    assert [drop_timing(r) for r in straight] == [drop_timing(r) for r in resumed]
    pa, pb = final_params(tmp_path / "straight", cfg), final_params(tmp_path / "resumed", cfg)
    jax.tree.map(np.testing.assert_array_equal, pa, pb)


def test_checkpoint_with_flat_attention_weights_restores(tmp_path):
    """Checkpoints of earlier versions hold q/k/v/o as flat [embed, heads * head_dim] matrices
    (weights, Adam moments, EMA): they restore into the heads-axis layout, values unchanged,
    onto a sharded mesh."""
    cfg = small_config()
    cfg.train.ema_decay = 0.9
    state = one_device_program(cfg).init_state(0)
    nudge = lambda x: x + 0.01 if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x  # noqa: E731
    state = jax.tree.map(nudge, state)  # Adam's moments nonzero

    legacy = jax.tree_util.tree_map_with_path(flat_attention_layout, state)
    assert legacy.params["transformer"]["blocks"]["attn"]["q"]["kernel"].ndim == 3
    checkpoints = Checkpointer(tmp_path / "checkpoints", keep=2)
    checkpoints.save(1, legacy, {}, {})
    checkpoints.wait()
    program = TrainProgram(cfg, make_mesh(2, 2, 2))
    restored, _ = checkpoints.restore(1, program.abstract_state())
    checkpoints.close()
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    q = restored.params["transformer"]["blocks"]["attn"]["q"]["kernel"]
    assert (
        q.sharding.spec
        == program.abstract_state()
        .params["transformer"]["blocks"]["attn"]["q"]["kernel"]
        .sharding.spec
    )


def test_export_with_flat_attention_weights_loads(tmp_path):
    """Exports of earlier versions hold q/k/v/o as flat matrices: `load_exported` gives them
    their heads axis, values unchanged."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from transfusion_jax.export import export, load_exported

    cfg = small_config()
    program = one_device_program(cfg)
    params = program.init_state(0).params
    new = tmp_path / "exports" / "new.safetensors"  # a folder that does not exist yet
    export(nnx.merge(program.graphdef, params), program.cfg, 3, new)
    assert sorted(p.name for p in new.parent.iterdir()) == ["new.safetensors"]  # no temporary
    with safe_open(str(new), framework="numpy") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    flat = {}
    for name, array in tensors.items():
        parts = name.split("/")
        path = [jax.tree_util.DictKey(part) for part in parts]
        flat[name] = np.asarray(flat_attention_layout(path, array))
    assert flat["transformer/blocks/attn/o/kernel"].ndim == 3  # [layers, heads * dim, embed]
    save_file(flat, str(tmp_path / "old.safetensors"), metadata=metadata)
    model, _, step = load_exported(tmp_path / "old.safetensors")
    assert step == 3
    restored = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, restored, jax.tree.map(np.asarray, params))


def test_resume_onto_a_different_mesh(tmp_path):
    first = small_config(fsdp=8)
    train(first, tmp_path / "run", stop_at_step=3)
    second = small_config(data=2, fsdp=2, tensor=2)
    train(second, tmp_path / "run")
    train(small_config(fsdp=8), tmp_path / "straight")
    resumed, straight = read_metrics(tmp_path / "run"), read_metrics(tmp_path / "straight")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    np.testing.assert_allclose(
        [r["loss"] for r in resumed], [r["loss"] for r in straight], rtol=2e-4
    )


class PoisonedSource(SyntheticSource):
    """Synthetic rows whose latents are NaN in batches 2 and 3 (0-based)."""

    def __next__(self):
        batch = super().__next__()
        if self.batches_done - 1 in (2, 3):
            batch = batch.replace(latents=np.full_like(batch.latents, np.nan))
        return batch


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setitem(data_module.SOURCES, "poisoned", PoisonedSource)


def test_nonfinite_loss_stops_without_poisoning_checkpoints(tmp_path, poisoned):
    cfg = small_config()
    cfg.data.source = "poisoned"
    with pytest.raises(NonFiniteLossError, match="step 3: the loss or gradient is not finite"):
        train(cfg, tmp_path / "stop")
    assert read_metrics(tmp_path / "stop")[-1]["nonfinite_steps"] == 1
    assert not (tmp_path / "stop" / "checkpoints" / "3").exists()

    cfg.train.nan_policy = "skip"
    train(cfg, tmp_path / "skip")
    records = read_metrics(tmp_path / "skip")
    assert records[-1]["nonfinite_steps"] == 2 and np.isfinite(records[-1]["loss"])
    state, program = final_state(tmp_path / "skip", cfg)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    # Adam's own counters saw 6 - 2 updates; the last logged rate is the one its schedule used.
    counts = {
        int(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
        if "count" in jax.tree_util.keystr(path)
    }
    assert counts == {4}
    np.testing.assert_allclose(records[-1]["learning_rate"], float(program.schedule(3)), rtol=1e-6)


def test_nan_policy_stop_after_a_resume_counts_only_the_steps_it_ran(tmp_path, poisoned):
    # Steps 3 and 4 are skipped under `skip`; resumed under `stop`, the clean steps 5 and 6 run,
    # and a new non-finite step would still stop it (the first test above).
    cfg = small_config()
    cfg.data.source = "poisoned"
    cfg.train.update(nan_policy="skip", num_steps=4)
    train(cfg, tmp_path)
    cfg.train.update(nan_policy="stop", num_steps=6)
    train(cfg, tmp_path, allow_config_change=True)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 7)) and records[-1]["nonfinite_steps"] == 2
    assert np.isfinite(records[-1]["loss"])


def test_a_skipped_step_leaves_its_windows_means_over_the_applied_steps(tmp_path, poisoned):
    # Steps 3 and 4 are skipped. Logged every step, they are the NaN records; logged every 3
    # steps, each window's means are those of its two applied steps, not NaN.
    cfg = small_config()
    cfg.data.source = "poisoned"
    cfg.train.update(nan_policy="skip", log_every=1)
    train(cfg, tmp_path / "every")
    cfg.train.log_every = 3
    train(cfg, tmp_path / "windows")
    every, windows = read_metrics(tmp_path / "every"), read_metrics(tmp_path / "windows")
    assert [np.isnan(r["loss"]) for r in every] == [False, False, True, True, False, False]
    assert [r["step"] for r in windows] == [3, 6]
    for record, steps in zip(windows, ([1, 2], [5, 6]), strict=True):
        for key in ("loss", "lm_loss", "diffusion_loss", "grad_norm"):
            expected = np.mean([every[s - 1][key] for s in steps])
            np.testing.assert_allclose(record[key], expected, rtol=1e-5)
    rates = [r["learning_rate"] for r in every]  # every step's rate, skipped ones included
    np.testing.assert_allclose(windows[1]["learning_rate"], np.mean(rates[3:]), rtol=1e-6)


def test_a_finished_run_started_again_says_so_without_compiling(tmp_path, monkeypatch, capsys):
    cfg = small_config()
    cfg.train.num_steps = 2
    train(cfg, tmp_path)
    metrics = (tmp_path / "metrics.jsonl").read_text()

    def must_not_compile(*args, **kwargs):
        raise AssertionError("a finished run compiled its step")

    monkeypatch.setattr(TrainProgram, "compile", must_not_compile)
    capsys.readouterr()
    assert train(cfg, tmp_path) == {}
    assert "already at step 2 of train.num_steps 2: nothing to train" in capsys.readouterr().out
    assert (tmp_path / "metrics.jsonl").read_text() == metrics


def test_a_stop_signal_at_an_evaluation_step_saves_without_evaluating(
    tmp_path, monkeypatch, capsys
):
    """A preemption's grace period is for the checkpoint: an evaluation due at that step (which
    may take minutes) is skipped, and said so."""

    class Raised(train_module.PreemptionFlag):
        def __init__(self):
            super().__init__()
            self.raised = "SIGTERM"  # as if it came during the first step

    def must_not_evaluate(*args, **kwargs):
        raise AssertionError("evaluated before the preemption checkpoint")

    monkeypatch.setattr(train_module, "PreemptionFlag", Raised)
    monkeypatch.setattr(train_module.TransfusionTask, "evaluate", must_not_evaluate)
    cfg = small_config()
    cfg.train.update(eval_every=1, log_every=2)
    train(cfg, tmp_path)
    out = capsys.readouterr().out
    assert "evaluation at step 1 skipped: a stop signal wants a checkpoint" in out
    assert "stopping at step 1 (SIGTERM); checkpoint saved" in out
    assert Checkpointer(tmp_path / "checkpoints", keep=3).latest_step() == 1


def test_weight_decay_mask_spares_norms_and_biases():
    cfg = tiny_config()
    program = TrainProgram(cfg, make_mesh(1, 1, 1, jax.devices()[:1]))
    params = jax.eval_shape(program._init, jax.random.key(0)).params
    mask = decay_mask(params)
    blocks = mask["transformer"]["blocks"]
    assert blocks["mlp"]["up"]["kernel"] and blocks["attn"]["q"]["kernel"]
    assert mask["embed"]["embedding"] and mask["lm_head"]["kernel"]
    assert not blocks["attn_norm"]["scale"] and not mask["transformer"]["final_norm"]["scale"]
    assert not mask["patching"]["proj_in"]["bias"]


def one_device_program(cfg):
    return TrainProgram(cfg, make_mesh(1, 1, 1, jax.devices()[:1]))


def test_gradient_accumulation_equals_the_whole_batch_gradient():
    """Text-only rows (no noise draws, so the loss is deterministic) of very different lengths:
    2 micro-batches must give the whole batch's gradient, each token counting once."""
    rng = np.random.default_rng(0)
    lengths = [60, 3, 50, 2, 45, 4, 40, 5]  # micro-batch 0 (rows 0, 2, ...) holds the long rows
    rows = [[[list(rng.integers(5, 300, n))]] for n in lengths]
    batch = jax.tree.map(jax.numpy.asarray, build_batch(rows, 64, 2, (8, 8, 4), 2, SPECIAL))
    grads, metrics = {}, {}
    for k in (1, 2):
        cfg = small_config()
        cfg.train.grad_accum_steps = k
        program = one_device_program(cfg)
        state = program.init_state(0)
        grads[k], metrics[k] = jax.jit(program._gradients)(state.params, batch, jax.random.key(7))
        assert float(metrics[k]["num_text_targets"]) == sum(n - 1 for n in lengths)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7), *grads.values()
    )
    for key in ("lm_loss", "lm_loss_after_image"):  # text only: nothing follows an image
        np.testing.assert_allclose(metrics[1][key], metrics[2][key], rtol=1e-5)
    assert float(metrics[1]["lm_loss_after_image"]) == 0.0


def test_lm_loss_after_image_is_the_captions_share_under_accumulation():
    """Rows of image-first documents (captions after images) and text: the logged LM loss after
    images is the mean cross-entropy of exactly the caption targets, with or without
    micro-batches."""
    rng = np.random.default_rng(1)
    rows = []
    for r in range(4):
        latent = rng.normal(size=(8, 8, 4)).astype(np.float32)
        caption = list(rng.integers(5, 300, 6 + r))
        rows.append([image_first_document(latent, caption, SPECIAL), [[1, 7, 8, 9, 2]]])
    batch = jax.tree.map(jax.numpy.asarray, build_batch(rows, 64, 2, (8, 8, 4), 2, SPECIAL))
    cfg = small_config()
    program = one_device_program(cfg)
    state = program.init_state(0)
    rng_key = jax.random.key(3)
    _, metrics = jax.jit(program.loss)(state.params, batch, rng_key)  # jitted: one compile
    caption = np.zeros(batch.tokens.shape, bool)  # EOI -> first caption token .. last -> EOS
    for r in range(4):
        eoi = int(np.flatnonzero(np.asarray(batch.tokens[r]) == SPECIAL.eoi)[0])
        caption[r, eoi : eoi + 6 + r + 1] = True

    @jax.jit
    def terms_of(params, part, key):
        t_rng, noise_rng = jax.random.split(key)
        t = program.diffusion.sample_timesteps(t_rng, part.noise_limited)
        noise = jax.random.normal(noise_rng, part.latents.shape)
        return loss_terms(program.model(params), part, t, noise, program.diffusion)

    def caption_ce(rows, key):
        """Summed cross-entropy of the caption targets of `rows`, drawn as the loss draws."""
        part = jax.tree.map(lambda x: x[rows], batch)
        terms = terms_of(state.params, part, key)
        assert (caption[rows] <= np.asarray(terms["token_mask"])).all()
        return float(np.asarray(terms["token_ce"])[caption[rows]].sum())

    count = caption.sum()
    want = caption_ce(np.arange(4), rng_key) / count
    np.testing.assert_allclose(metrics["lm_loss_after_image"], want, rtol=1e-5)
    # two micro-batches: rows 0, 2 with key fold_in(key, 0) and rows 1, 3 with fold_in(key, 1)
    cfg.train.grad_accum_steps = 2
    program2 = one_device_program(cfg)
    _, accumulated = jax.jit(program2._gradients)(state.params, batch, rng_key)
    parts = [caption_ce(np.arange(i, 4, 2), jax.random.fold_in(rng_key, i)) for i in (0, 1)]
    np.testing.assert_allclose(accumulated["lm_loss_after_image"], sum(parts) / count, rtol=1e-5)


def test_ema_follows_the_weights():
    cfg = small_config()
    cfg.train.ema_decay = 0.5
    program = one_device_program(cfg)
    state = program.init_state(0)
    source = SyntheticSource(program.cfg, 8)
    step = jax.jit(program.train_step)
    expected = jax.tree.map(np.asarray, state.params)
    for _ in range(3):
        state, _ = step(state, jax.tree.map(jax.numpy.asarray, next(source)))
        expected = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * np.asarray(p), expected, state.params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        state.ema_params,
        expected,
    )


def test_bfloat16_compute_with_float32_master_weights():
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = small_config()
        cfg.model.dtype = dtype
        program = one_device_program(cfg)
        state = program.init_state(0)
        batch = jax.tree.map(jax.numpy.asarray, next(SyntheticSource(program.cfg, 8)))
        new_state, metrics = jax.jit(program.train_step)(state, batch)
        assert jax.tree.leaves(new_state.params)[0].dtype == np.float32
        losses[dtype] = float(metrics["loss"])
    assert np.isfinite(losses["bfloat16"])
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.05)


def test_logged_throughput_matches_the_wall_clock(tmp_path, monkeypatch):
    """tokens/s is timed on what the device finished, not on the asynchronous dispatch."""
    written = []
    original = train_module.MetricsWriter.write

    def timed_write(self, record):
        written.append(time.perf_counter())
        original(self, record)

    monkeypatch.setattr(train_module.MetricsWriter, "write", timed_write)
    cfg = small_config()
    cfg.train.update(num_steps=30, log_every=1, checkpoint_every=1000)
    train(cfg, tmp_path)
    records = read_metrics(tmp_path)[1:]  # each later window starts when the one before logged
    tokens = len(records) * cfg.train.batch_size * cfg.data.seq_len
    logged_seconds = sum(tokens / len(records) / r["tokens_per_s"] for r in records)
    wall_seconds = written[-1] - written[0]
    assert 0.8 < logged_seconds / wall_seconds <= 1.0 + 1e-6, (logged_seconds, wall_seconds)


def test_wandb_logging_continues_one_run_per_workdir(tmp_path, monkeypatch):
    """Against a stand-in wandb module that records what the trainer sends."""
    import sys
    import types

    calls = []
    run = types.SimpleNamespace(
        log=lambda data, step: calls.append(("log", step, data)),
        finish=lambda: calls.append(("finish",)),
    )
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw)) or run,
        util=types.SimpleNamespace(generate_id=lambda: "run-id-1"),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = small_config()
    # 6 steps, as small_config's other runs (the same compiled step)
    cfg.train.update(num_steps=6, log_every=2, checkpoint_every=2, wandb_project="proj")
    train(cfg, tmp_path, stop_at_step=2)
    train(cfg, tmp_path)
    inits = [c[1] for c in calls if c[0] == "init"]
    assert [i["id"] for i in inits] == ["run-id-1", "run-id-1"] and inits[0]["project"] == "proj"
    assert all(i["resume"] == "allow" for i in inits)
    logged = [(c[1], c[2]) for c in calls if c[0] == "log"]
    records = read_metrics(tmp_path)
    assert [s for s, _ in logged] == [r["step"] for r in records] == [2, 4, 6]
    assert logged[-1][1]["loss"] == records[-1]["loss"]
    assert [c[0] for c in calls].count("finish") == 2
