"""experiments/aot_compile.py: the real train step compiled for a virtual TPU slice (libtpu, no
TPU), and its per-chip memory lines."""

import importlib.util
import math

import pytest

from experiments import aot_compile

KEYS = (
    "argument_bytes_per_chip",
    "temp_bytes_per_chip",
    "peak_bytes_per_chip",
    "hbm_bytes_per_chip",
    "fits",
    "step_flops",
    "custom_calls",
    "compile_s",
)


def flash_kernel_exists() -> bool:
    return importlib.util.find_spec("transfusion_jax.kernels.tpu_flash") is not None


@pytest.fixture
def v5e_2x2(monkeypatch):
    """The name of a virtual 4-chip TPU v5e slice, or a skip where libtpu cannot describe it."""
    pytest.importorskip("libtpu", reason="libtpu is not installed")
    from jax.experimental import topologies

    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another process may hold libtpu
    try:
        topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
    except Exception as e:  # a libtpu that cannot describe the slice
        pytest.skip(f"libtpu cannot describe v5e:2x2: {e}")
    return "v5e:2x2"


def last_lines(capsys) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()[-len(KEYS) :]
    values = dict(line.split("=", 1) for line in lines)
    assert tuple(values) == KEYS
    return {k: float(v) for k, v in values.items()}


@pytest.mark.slow  # about 40 s of XLA:TPU compile on 2 cores
def test_paper_config_compiles_for_a_small_slice(v5e_2x2, capsys):
    attention = "tpu_flash" if flash_kernel_exists() else "xla"
    argv = ["--config", "configs/paper.py:0.16b", "--topology", v5e_2x2, "--seq", "1024"]
    assert aot_compile.main([*argv, "--batch", "4", "--attention", attention]) == 0

    values = last_lines(capsys)
    assert values["fits"] == 1
    assert values["compile_s"] > 0
    assert values["hbm_bytes_per_chip"] == 16 * 2**30
    assert 0 < values["argument_bytes_per_chip"] < values["peak_bytes_per_chip"]
    assert values["peak_bytes_per_chip"] <= values["hbm_bytes_per_chip"]
    assert values["temp_bytes_per_chip"] > 0 and math.isfinite(values["step_flops"])
    if attention == "tpu_flash":
        assert values["custom_calls"] > 0
    else:
        assert values["custom_calls"] == 0


def test_a_step_that_does_not_fit_prints_fits_0(v5e_2x2, capsys):
    """XLA:TPU refuses the compile (RESOURCE_EXHAUSTED, in seconds): reported, not raised."""
    argv = ["--config", "configs/paper.py:0.76b", "--topology", v5e_2x2, "--seq", "4096"]
    assert aot_compile.main([*argv, "--batch", "16", "--attention", "xla"]) == 0

    values = last_lines(capsys)
    assert values["fits"] == 0
    assert values["temp_bytes_per_chip"] > values["hbm_bytes_per_chip"]  # XLA's figure
    assert values["peak_bytes_per_chip"] > values["hbm_bytes_per_chip"]
    assert values["argument_bytes_per_chip"] > 2e9  # 0.78B weights + Adam, in float32, / 4
    assert math.isnan(values["custom_calls"]) and values["step_flops"] > 0
