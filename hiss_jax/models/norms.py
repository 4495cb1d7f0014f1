"""Norms shared by the Mamba-family blocks.

`RMSNormGated` is Mamba-2's output norm (Dao & Gu 2024, arXiv 2405.21060, Sec. 7.2, "extra
normalization"): RMSNorm(y * silu(z)) per group of channels, as mamba_ssm's `RMSNormGated`
with `norm_before_gate=False`.
"""
import jax
import jax.numpy as jnp
from flax import linen as nn


class RMSNormGated(nn.Module):
    """Gated RMSNorm over groups of channels.

    y, z: (..., D) -> (..., D).  out = RMSNorm_g(y * silu(z)) * scale, where RMSNorm_g normalises
    each of the `n_groups` contiguous groups of D // n_groups channels separately (Mamba-2 uses
    one group per B/C group so that tensor-parallel shards stay independent).
    """
    n_groups: int = 1
    eps: float = 1e-5

    @nn.compact
    def __call__(self, y, z):
        d = y.shape[-1]
        if z.shape != y.shape:
            raise ValueError(f"RMSNormGated needs z shaped like y, got {y.shape=} {z.shape=}")
        if d % self.n_groups:
            raise ValueError(f"channels {d=} not divisible by {self.n_groups=}; "
                             "pick n_groups dividing the channel count")
        scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
        # Gate before the norm (norm_before_gate=False); statistics in float32.
        h = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        hg = h.reshape(*h.shape[:-1], self.n_groups, d // self.n_groups)
        hg = hg * jax.lax.rsqrt(jnp.mean(hg * hg, axis=-1, keepdims=True) + self.eps)
        return (hg.reshape(h.shape) * scale).astype(y.dtype)
