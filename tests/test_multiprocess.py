"""Multi-host training, simulated: two processes of two CPU devices each (jax.distributed over
localhost, gloo collectives), each feeding its own half of the global batch, must train exactly
like one process with four devices."""

import json
import socket
import subprocess
import sys

import numpy as np

from tests.helpers import ROOT, command_env

OVERRIDES = [
    "--config.data.source=synthetic",
    "--config.patch.kind=linear",
    "--config.model.d_model=64",
    "--config.model.depth=2",
    "--config.image.latent_size=8",
    "--config.image.latent_channels=4",
    "--config.image.patch_size=2",
    "--config.data.seq_len=64",
    "--config.train.num_steps=4",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=4",
]


def launch(workdir, devices, **env):
    cmd = [
        sys.executable,
        "-m",
        "transfusion_jax.train",
        "--config",
        "configs/tiny.py",
        "--workdir",
        str(workdir),
        *OVERRIDES,
    ]
    env = command_env(devices, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", **env)
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_two_processes_train_like_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = [
        launch(
            tmp_path / "two",
            2,
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
        )
        for i in range(2)
    ]
    single = launch(tmp_path / "one", 4)
    outputs = []
    for proc in [*workers, single]:
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, out[-3000:]
        outputs.append(out)
    # process 0 logs the global mesh: 4 devices over 2 processes
    assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1} over 4 cpu devices" in outputs[0]
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(two) == len(one) == 4
    np.testing.assert_allclose(two, one, rtol=1e-4)
    assert (tmp_path / "two" / "checkpoints" / "4").is_dir()
