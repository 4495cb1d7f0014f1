"""Scan kernels for HiSS: selective scan (Mamba-1) and SSD (Mamba-2).

Each op's public function, references and dispatch live in `kernels/<op>.py`; its Pallas
kernels (with their `jax.custom_vjp` wrappers) in sibling modules: selective_scan_triton /
selective_scan_mgpu (+ selective_scan_common), ssd_long / ssd_short (+ ssd_common).
`kernels` never imports `hiss_jax`.
"""
from kernels.selective_scan import selective_scan
from kernels.ssd import ssd

__all__ = ["selective_scan", "ssd"]
