"""The flash kernels inside the real train step: on a data x fsdp x tensor mesh (the kernel runs
per device under shard_map) one step equals the dense XLA step on one device."""

import jax
import numpy as np
import pytest

from tests.test_training import small_config
from transfusion_jax import sharding as shd
from transfusion_jax.data.synthetic import SyntheticSource
from transfusion_jax.train_step import TrainProgram


def one_step(cfg, mesh):
    program = TrainProgram(cfg, mesh)
    batch = shd.global_batch(next(SyntheticSource(cfg, cfg.train.batch_size)), mesh)
    step = program.compile(batch)
    state, metrics = step(program.init_state(0), batch)
    return jax.tree.map(np.asarray, (state.params, metrics))


@pytest.mark.parametrize("kernel", ["tpu_flash"])
def test_sharded_flash_step_equals_dense_step(kernel):
    dense = small_config(fsdp=1)
    dense.model.update(num_heads=4, num_kv_heads=2, attention="xla")
    params_dense, metrics_dense = one_step(dense, shd.make_mesh(1, 1, 1, jax.devices()[:1]))
    flash = small_config(data=2, fsdp=2, tensor=2)
    flash.model.update(num_heads=4, num_kv_heads=2, attention=kernel)
    params_flash, metrics_flash = one_step(flash, shd.make_mesh(2, 2, 2))
    for key in ("loss", "lm_loss", "diffusion_loss", "grad_norm"):
        np.testing.assert_allclose(metrics_flash[key], metrics_dense[key], rtol=2e-4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-6),
        params_flash,
        params_dense,
    )
