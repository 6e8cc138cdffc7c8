"""Flash-attention kernels for the Transfusion mask (Pallas): `tpu_flash` (Mosaic) and `gpu_flash`
(Triton), both driven by per-query key ranges (`attention.key_ranges`) and the per-block bounds in
`blocks.py`, so blocks that no query of a tile may see are never computed."""
