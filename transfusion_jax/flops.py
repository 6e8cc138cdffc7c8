"""Model FLOPs per token and device peaks, for MFU.

Model FLOPs follow the PaLM convention: 6 N per token for the N weights a token passes through
(transformer and LM head; with the linear patch layers, those too) plus 12 * depth * d_model * L
for attention scores over a row of L positions, forward and backward, whatever the mask skips.
The U-Net's convolutions are not counted: MFU for U-Net configs is a lower bound.
"""

import ml_collections

from transfusion_jax.model_config import ModelSpec, as_model_spec

# Dense bf16 peak per device, TFLOP/s, by a substring of jax's device_kind.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "TPU v6": 918.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5": 459.0,  # v5p reports "TPU v5"
    "TPU v4": 275.0,
}


def device_peak_tflops(device) -> float | None:
    for name, peak in PEAK_BF16_TFLOPS.items():
        if name in device.device_kind:
            return peak
    return None


def model_flops_per_token(
    spec: ModelSpec | ml_collections.ConfigDict, seq_len: int, counts: dict
) -> float:
    """Training FLOPs per position of a row of `seq_len`; `counts` from `model.parameter_counts`.
    A ConfigDict is converted with `ModelSpec.from_config`."""
    spec = as_model_spec(spec)
    transformer = spec.transformer
    weights = counts["transformer"]
    # The LM head (tied or not, it is a matmul per token).
    weights += transformer.d_model * transformer.vocab_size
    if spec.patch.kind == "linear":
        weights += counts["patch"]
    return 6.0 * weights + 12.0 * transformer.depth * transformer.d_model * seq_len
