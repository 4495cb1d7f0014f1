"""Scan kernels for HiSS: selective scan (Mamba-1) and SSD (Mamba-2).

Each op lives in one file with its Pallas kernel(s), the `jax.custom_vjp` wrapper and the
references. `kernels` never imports `hiss_jax`.
"""
from kernels.selective_scan import selective_scan
from kernels.ssd import ssd

__all__ = ["selective_scan", "ssd"]
