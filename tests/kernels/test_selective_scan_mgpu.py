"""Selective scan, Mosaic GPU forward (kernels/selective_scan_mgpu.py) against the reference.

The kernel runs in Mosaic GPU interpret mode on CPU (the Triton backward in Triton interpret
mode). Lengths, widths and d_state are odd on purpose (time, channel and state padding), with
groups, every optional argument on and off, bf16, and pipelines of 1 to 3 stages. Skipped on
jax versions without the Pallas Mosaic GPU API used here (jax < 0.11.2).
"""
import functools

import jax
import jax.numpy as jnp
import pytest

from kernels.selective_scan_mgpu import AVAILABLE, MgpuBlockSizes, selective_scan_mgpu
from tests.conftest import has_gpu
from tests.kernels.test_selective_scan import FLOAT_ARGS, check_against_ref, make_inputs

pytestmark = pytest.mark.skipif(
    not AVAILABLE, reason=f"jax {jax.__version__} lacks the Pallas Mosaic GPU API "
                          f"(plgpu.kernel with Lane semantics, InterpretGPUParams): jax >= 0.11.2")

# (length, d_inner, d_state, n_groups, dtype, optional-args switches, softplus, MgpuBlockSizes)
CASES = [
    (37, 130, 5, None, jnp.float32, dict(), True, MgpuBlockSizes()),
    (45, 24, 16, 3, jnp.bfloat16, dict(), True, MgpuBlockSizes(tile=16, stages=2, unroll=2)),
    (33, 40, 3, 2, jnp.float32, dict(D=False, z=False, bias=False, h0=False), False,
     MgpuBlockSizes(tile=16, stages=1, unroll=16)),
    (64, 128, 16, None, jnp.float32, dict(z=False), True, MgpuBlockSizes(tile=32, stages=2)),
]


@pytest.mark.parametrize("l,di,n,g,dtype,opts,softplus,bs", CASES)
def test_mgpu_matches_reference(l, di, n, g, dtype, opts, softplus, bs):
    # Outputs, final state and the vjp of a random cotangent w.r.t. every input.
    args = make_inputs(l + di, 2, l, di, n, g=g, dtype=dtype, softplus=softplus, **opts)
    fn = functools.partial(selective_scan_mgpu, block_sizes=bs, interpret=True)
    check_against_ref(fn, args, softplus, dtype)


def test_mgpu_lowers_to_mosaic_gpu_without_gpu():
    # Cross-lowering runs the whole Mosaic GPU lowering (layouts, TMA descriptors, barriers)
    # on CPU: what interpret mode cannot check short of the GPU compile itself. Both forward
    # kernels: without saved states (primal) and with them (the vjp's forward). (The Triton
    # backward's cross-lowering is tested in test_selective_scan.py on jax 0.10.2; 0.11.2
    # asks for an abstract GPU device there.)
    args = make_inputs(1, 2, 50, 136, 6, g=2, dtype=jnp.bfloat16)
    names = [k for k in FLOAT_ARGS if args[k] is not None]

    def f(*vals):
        kw = dict(zip(names, vals))
        return selective_scan_mgpu(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"],
                                   kw["z"], kw["delta_bias"], delta_softplus=True,
                                   initial_state=kw["initial_state"], return_final_state=True,
                                   interpret=False)

    vals = [args[k] for k in names]
    for fn in (f, lambda *v: jax.vjp(f, *v)[0]):
        text = jax.jit(fn).trace(*vals).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("custom_call @mosaic_gpu") == 1, text[:2000]


def test_block_sizes_validate():
    with pytest.raises(ValueError, match="multiple of 16"):
        MgpuBlockSizes(tile=24)
    with pytest.raises(ValueError, match="must divide 16"):
        MgpuBlockSizes(unroll=3)
    with pytest.raises(ValueError, match="stages"):
        MgpuBlockSizes(stages=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mgpu_compiled_on_gpu_matches_reference(dtype):
    args = make_inputs(5, 2, 300, 200, 16, g=2, dtype=dtype)
    if not has_gpu():
        pytest.skip("needs a CUDA GPU")
    check_against_ref(functools.partial(selective_scan_mgpu, interpret=False), args, True,
                      dtype)
