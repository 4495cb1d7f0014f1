"""S4 / S4D: SSM math against closed forms and dense references, the stack, streaming steps."""
import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from hiss_jax.models import ssm_math
from hiss_jax.models.s4 import S4_SSM_PARAM_NAMES, S4Layer, S4Stack
from tests.conftest import TOLERANCES, assert_close

DISCS = ("bilinear", "zoh", "approx_zoh")
COMBOS = [(m, d) for m in ("dplr", "diag") for d in DISCS]
H, N, L, BATCH = 4, 8, 37, 2


def assert_close_f64(actual, expected, what):
    """float64 (or complex128) comparison against TOLERANCES["float64"]["out"].

    conftest.rel_err rounds through float32, too coarse for the float64 entry.
    """
    a, e = np.asarray(actual), np.asarray(expected)
    assert a.shape == e.shape, f"{what}: {a.shape=} vs {e.shape=}"
    assert a.dtype in (np.float64, np.complex128), f"{what}: {a.dtype=} is not 64-bit"
    err = np.linalg.norm((a - e).ravel()) / max(np.linalg.norm(e.ravel()), 1e-300)
    tol = TOLERANCES["float64"]["out"]
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} (float64)"


# ------------------------------------------------------------------ numpy float64 references
def _np_complex(x):
    x = np.asarray(x, np.float64)
    return x[..., 0] + 1j * x[..., 1]


def _np_dense(lam, p, b):
    """Conjugate-completed A_f (H, N, N), B_f (H, N) in float64 numpy."""
    lam_f = np.concatenate([lam, lam.conj()], -1)
    p_f = np.concatenate([p, p.conj()], -1)
    b_f = np.concatenate([b, b.conj()], -1)
    a_f = np.stack([np.diag(lf) for lf in lam_f]) - p_f[..., :, None] * p_f.conj()[..., None, :]
    return a_f, b_f


def _np_discretize(a, b, dt, disc):
    n = a.shape[-1]
    eye = np.eye(n)
    if disc == "bilinear":
        inv = np.linalg.inv(eye - dt / 2 * a)
        return inv @ (eye + dt / 2 * a), inv @ (dt * b)
    if disc == "approx_zoh":
        return scipy.linalg.expm(a * dt), dt * b
    aug = np.zeros((n + 1, n + 1), complex)
    aug[:n, :n], aug[:n, n] = a * dt, b * dt
    e = scipy.linalg.expm(aug)
    return e[:n, :n], e[:n, n]


def _np_powered_kernel(da, db, c, length):
    """K_k = Re(c A^k b) by explicit powering."""
    out, x = [], db.copy()
    for _ in range(length):
        out.append((c @ x).real)
        x = da @ x
    return np.array(out)


def _layer_params(ssm_vars, mode):
    prm = {k: np.asarray(v, np.float64) for k, v in ssm_vars.items()}
    lam = -np.exp(prm["log_A_re"]) + 1j * prm["A_im"]
    p = _np_complex(prm["P"]) if mode == "dplr" else np.zeros_like(lam)
    return lam, p, _np_complex(prm["B"]), _np_complex(prm["C"]), np.exp(prm["log_dt"]), prm["D"]


# ------------------------------------------------------------------ HiPPO / discretisation
def test_hippo_legs_small_closed_form():
    a, b = ssm_math.hippo_legs(3)
    s3, s5, s15 = np.sqrt(3), np.sqrt(5), np.sqrt(15)
    np.testing.assert_allclose(a, [[-1, 0, 0], [-s3, -2, 0], [-s5, -s15, -3]], rtol=1e-14)
    np.testing.assert_allclose(b, [1, s3, s5], rtol=1e-14)


@pytest.mark.parametrize("n", [8, 64])
def test_nplr_reconstructs_dense_legs(n):
    a, b = ssm_math.hippo_legs(n)
    lam, p, bt, v = ssm_math.hippo_legs_nplr(n)
    assert lam.shape == p.shape == bt.shape == (n // 2,) and v.shape == (n, n // 2)
    np.testing.assert_allclose(lam.real, -0.5, atol=1e-12)
    assert np.all(lam.imag > 0)
    v_f = np.concatenate([v, v.conj()], axis=1)
    np.testing.assert_allclose(v_f.conj().T @ v_f, np.eye(n), atol=1e-12)
    a_f, b_f = _np_dense(lam[None], p[None], bt[None])
    rec = (v_f @ a_f[0] @ v_f.conj().T)
    assert np.abs(rec.imag).max() < 1e-10 * np.abs(a).max()
    assert_close_f64(rec.real, a, "V_f (Lambda - p p^*) V_f^* vs LegS A")
    assert_close_f64((v_f @ b_f[0]).real, b, "V_f B vs LegS B")


def test_s4d_inits_closed_form():
    lam, b = ssm_math.s4d_init(8, "lin")
    np.testing.assert_allclose(lam, -0.5 + 1j * np.pi * np.arange(4), rtol=1e-14)
    np.testing.assert_allclose(b, 1.0)
    lam, _ = ssm_math.s4d_init(8, "inv")
    np.testing.assert_allclose(lam.imag, 8 / np.pi * (8 / np.array([1, 3, 5, 7]) - 1), rtol=1e-14)
    lam, b = ssm_math.s4d_init(8, "legs")
    lam_nplr, _, b_nplr, _ = ssm_math.hippo_legs_nplr(8)
    np.testing.assert_allclose(lam, lam_nplr, rtol=1e-14)
    np.testing.assert_allclose(b, b_nplr, rtol=1e-14)
    with pytest.raises(ValueError, match="diag_init='foo'"):
        ssm_math.s4d_init(8, "foo")


def test_discretize_scalar_closed_form():
    a, b, dt = -0.7 + 0.3j, 1.3 - 0.2j, 0.1
    expected = {
        "bilinear": ((1 + dt * a / 2) / (1 - dt * a / 2), dt * b / (1 - dt * a / 2)),
        "zoh": (np.exp(a * dt), (np.exp(a * dt) - 1) / a * b),
        "approx_zoh": (np.exp(a * dt), dt * b),
    }
    with jax.enable_x64(True):
        for disc, (da_ref, db_ref) in expected.items():
            da, db = ssm_math.discretize_diag(jnp.array([a]), jnp.array([b]), dt, disc)
            np.testing.assert_allclose([da[0], db[0]], [da_ref, db_ref], rtol=1e-13)
            da, db = ssm_math.discretize_dense(jnp.array([[a]]), jnp.array([b]), dt, disc)
            np.testing.assert_allclose([da[0, 0], db[0]], [da_ref, db_ref], rtol=1e-13)


def test_discretize_jordan_block_closed_form():
    """A = [[a, 1], [0, a]], B = [0, 1]: every discretisation in closed form."""
    a, dt = -0.9, 0.2
    h, m, q, e = dt / 2, 1 - dt / 2 * a, 1 + dt / 2 * a, np.exp(a * dt)
    expected = {
        "bilinear": ([[q / m, h / m + h * q / m**2], [0, q / m]], [h * dt / m**2, dt / m]),
        "zoh": ([[e, dt * e], [0, e]], [(e * (a * dt - 1) + 1) / a**2, (e - 1) / a]),
        "approx_zoh": ([[e, dt * e], [0, e]], [0.0, dt]),
    }
    with jax.enable_x64(True):
        for disc, (da_ref, db_ref) in expected.items():
            da, db = ssm_math.discretize_dense(
                jnp.array([[a, 1.0], [0.0, a]]), jnp.array([0.0, 1.0]), dt, disc)
            np.testing.assert_allclose(da, da_ref, rtol=1e-13, atol=1e-15, err_msg=disc)
            np.testing.assert_allclose(db, db_ref, rtol=1e-13, atol=1e-15, err_msg=disc)


def test_bad_disc_raises():
    with pytest.raises(ValueError, match="disc='euler'"):
        ssm_math.discretize_diag(jnp.ones(2), jnp.ones(2), 0.1, "euler")


# ------------------------------------------------------------------ kernels vs dense powering
def _random_dplr(rng, h, n):
    lam, p, b, _ = ssm_math.hippo_legs_nplr(n)
    lam = lam + 0.05 * rng.standard_normal((h, n // 2))
    p = p + 0.1 * (rng.standard_normal((h, n // 2)) + 1j * rng.standard_normal((h, n // 2)))
    b = np.broadcast_to(b, (h, n // 2))
    c = rng.standard_normal((h, n // 2)) + 1j * rng.standard_normal((h, n // 2))
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), h))
    return lam, p, b, c, dt


@pytest.mark.parametrize("length", [36, 37])
def test_cauchy_woodbury_kernel_matches_powering(length):
    """Even lengths hit omega = -1, where the naive 2/(1+omega) factor is singular."""
    rng = np.random.default_rng(0)
    lam, p, b, c, dt = _random_dplr(rng, 2, N)
    a_f, b_f = _np_dense(lam, p, b)
    c_f = np.concatenate([c, c.conj()], -1)
    ref = np.stack([_np_powered_kernel(*_np_discretize(a_f[i], b_f[i], dt[i], "bilinear"),
                                       c_f[i], length) for i in range(2)])
    with jax.enable_x64(True):
        args = [jnp.asarray(v) for v in (lam, p, b, c, dt)]
        c_tilde = ssm_math.dplr_c_tilde(*args, length)
        k64 = ssm_math.dplr_kernel_bilinear(*args[:3], c_tilde, args[4], length)
    assert_close_f64(k64, ref, "Cauchy kernel, float64")
    args = [jnp.asarray(v, jnp.complex64) for v in (lam, p, b, c)] + [jnp.asarray(dt, jnp.float32)]
    c_tilde = ssm_math.dplr_c_tilde(*args, length)
    k32 = ssm_math.dplr_kernel_bilinear(*args[:3], c_tilde, args[4], length)
    assert_close(k32, ref, jnp.float32, what="Cauchy kernel, float32")


@pytest.mark.parametrize("disc", DISCS)
def test_dense_and_vandermonde_kernels_match_powering(disc):
    rng = np.random.default_rng(1)
    lam, p, b, c, dt = _random_dplr(rng, 2, N)
    a_f, b_f = _np_dense(lam, p, b)
    c_f = np.concatenate([c, c.conj()], -1)
    disc_np = [_np_discretize(a_f[i], b_f[i], dt[i], disc) for i in range(2)]
    ref = np.stack([_np_powered_kernel(da, db, c_f[i], L) for i, (da, db) in enumerate(disc_np)])
    # Diagonal reference: drop the low-rank term.
    a_d, b_d = _np_dense(lam, 0 * p, b)
    ref_d = np.stack([_np_powered_kernel(*_np_discretize(a_d[i], b_d[i], dt[i], disc), c_f[i], L)
                      for i in range(2)])
    with jax.enable_x64(True):
        da = jnp.stack([d[0] for d in disc_np])
        db = jnp.stack([d[1] for d in disc_np])
        k_dense = ssm_math.dense_kernel(da, db, jnp.asarray(c_f), L)
        dad, dbd = ssm_math.discretize_diag(jnp.asarray(lam), jnp.asarray(b),
                                            jnp.asarray(dt)[:, None], disc)
        k_diag = ssm_math.vandermonde_kernel(dad, dbd, jnp.asarray(c), L)
    assert_close_f64(k_dense, ref, f"Krylov kernel {disc}")
    assert_close_f64(k_diag, ref_d, f"Vandermonde kernel {disc}")


def test_dplr_bilinear_woodbury_step_matches_dense_step():
    """The O(N) Woodbury step equals stepping the dense bilinear matrix, from a random state."""
    rng = np.random.default_rng(2)
    lam, p, b, c, dt = _random_dplr(rng, 3, N)
    x0 = rng.standard_normal((BATCH, 3, N // 2)) + 1j * rng.standard_normal((BATCH, 3, N // 2))
    u = rng.standard_normal((BATCH, 3))
    with jax.enable_x64(True):
        lam, p, b, c, dt, x0, u = map(jnp.asarray, (lam, p, b, c, dt, x0, u))
        x_w, y_w = ssm_math.dplr_bilinear_step(x0, u, lam, p, b, c, dt)
        da, db = ssm_math.discretize_dense(*ssm_math.dplr_dense(lam, p, b), dt, "bilinear")
        x_d, y_d = ssm_math.dense_half_step(x0, u, da[:, : N // 2], db[:, : N // 2], c)
    assert_close_f64(x_w, x_d, "Woodbury step state")
    assert_close_f64(y_w, y_d, "Woodbury step output")


# ------------------------------------------------------------------ the layer and the stack
@functools.lru_cache(maxsize=None)
def _stack(mode, disc):
    model = S4Stack(d_model=H, n_layers=2, dropout=0.1, d_state=N, mode=mode, disc=disc)
    x = jax.random.normal(jax.random.key(2), (BATCH, L, H))
    return model, jax.jit(model.init)(jax.random.key(3), x), x


@functools.lru_cache(maxsize=None)
def _layer(mode, disc):
    """The first block's SSM of `_stack` (shares its parameters; saves an init compile)."""
    _, stack_vars, _ = _stack(mode, disc)
    layer = S4Layer(H, d_state=N, mode=mode, disc=disc)
    u = jax.random.normal(jax.random.key(0), (BATCH, L, H))
    return layer, {"params": stack_vars["params"]["blocks_0"]["ssm"]}, u


@pytest.mark.parametrize("mode,disc", COMBOS)
def test_layer_convolution_equals_float64_recurrence(mode, disc):
    layer, variables, u = _layer(mode, disc)
    y = layer.apply(variables, u)
    lam, p, b, c, dt, d = _layer_params(variables["params"], mode)
    a_f, b_f = _np_dense(lam, p, b)
    c_f = np.concatenate([c, c.conj()], -1)
    un = np.asarray(u, np.float64)
    ref = np.zeros_like(un)
    for h in range(H):
        da, db = _np_discretize(a_f[h], b_f[h], dt[h], disc)
        x = np.zeros((BATCH, 2 * (N // 2)), complex)
        for t in range(L):
            x = x @ da.T + un[:, t, h, None] * db
            ref[:, t, h] = (x @ c_f[h]).real + d[h] * un[:, t, h]
    assert_close(y, ref, jnp.float32, what=f"S4Layer {mode}/{disc} vs recurrence")


@pytest.mark.parametrize("mode,disc", COMBOS)
def test_stack_step_matches_call(mode, disc):
    model, variables, x = _stack(mode, disc)
    y = model.apply(variables, x)
    state = model.apply(variables, BATCH, method="init_state")

    @jax.jit
    def run(state, xs):
        def body(s, x_t):
            return model.apply(variables, s, x_t, method="step")
        return jax.lax.scan(body, state, jnp.swapaxes(xs, 0, 1))

    _, ys = run(state, x)
    assert_close(jnp.swapaxes(ys, 0, 1), y, jnp.float32, what=f"S4Stack {mode}/{disc} step")
    # The residual stream dominates y; the blocks' contribution alone must agree as well.
    assert_close(jnp.swapaxes(ys, 0, 1) - x, y - x, jnp.float32, what="block contribution")


@pytest.mark.parametrize("mode,disc", [("dplr", "bilinear"), ("diag", "zoh")])
def test_stack_causal_and_length_independent(mode, disc):
    """Perturbing x after t leaves outputs up to t unchanged; a shorter sequence (different
    kernel length, hence different C~) gives the same prefix."""
    model, variables, x = _stack(mode, disc)
    t = 20
    y = model.apply(variables, x)
    x2 = x.at[:, t + 1:].add(jax.random.normal(jax.random.key(4), x[:, t + 1:].shape))
    y2 = model.apply(variables, x2)
    assert_close(y2[:, : t + 1], y[:, : t + 1], jnp.float32, what="prefix after perturbation")
    assert rel_change(y2[:, t + 1:], y[:, t + 1:]) > 1e-2
    y_short = model.apply(variables, x[:, :10])
    assert_close(y_short, y[:, :10], jnp.float32, what="length-10 prefix")


def rel_change(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_stack_shapes_dropout_and_finite_grads():
    model, variables, x = _stack("dplr", "bilinear")
    y = model.apply(variables, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y_a = model.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(5)})
    y_b = model.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(6)})
    assert rel_change(y_a, y_b) > 1e-3
    cot = jax.random.normal(jax.random.key(7), x.shape)
    loss = lambda p: jnp.sum(model.apply({"params": p}, x) * cot)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(variables["params"])
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for _, g in leaves)
    ssm_grads = [g for path, g in leaves if path[-1].key in S4_SSM_PARAM_NAMES]
    assert ssm_grads and all(float(jnp.abs(g).max()) > 0 for g in ssm_grads)


@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_ssm_param_names_and_init(mode):
    layer, variables, _ = _layer(mode, "bilinear")
    prm = variables["params"]
    expected = set(S4_SSM_PARAM_NAMES) - ({"P"} if mode == "diag" else set())
    assert set(prm) == expected
    np.testing.assert_allclose(-np.exp(prm["log_A_re"]), -0.5, rtol=1e-6)
    dt = np.exp(prm["log_dt"])
    assert np.all((dt >= 1e-3 * (1 - 1e-6)) & (dt <= 1e-1 * (1 + 1e-6)))
    if mode == "dplr":
        lam, p, _, _ = ssm_math.hippo_legs_nplr(N)
        np.testing.assert_allclose(prm["A_im"][0], lam.imag, rtol=1e-5)
        np.testing.assert_allclose(_np_complex(prm["P"][1]), p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="full"), "mode='full'"),
    (dict(disc="euler"), "disc='euler'"),
    (dict(d_state=7), "d_state=7"),
    (dict(dt_min=0.5, dt_max=0.1), "dt_min=0.5"),
])
def test_stack_validates_options(kwargs, match):
    model = S4Stack(d_model=H, n_layers=1, **kwargs)
    with pytest.raises(ValueError, match=match):
        model.init(jax.random.key(0), jnp.zeros((1, 5, H)))


def test_bfloat16_inputs_keep_dtype_and_track_float32():
    model, variables, x = _stack("dplr", "bilinear")
    y16 = model.apply(variables, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    assert_close(y16, model.apply(variables, x), jnp.bfloat16, what="S4Stack bf16 vs f32")


@pytest.mark.parametrize("disc", DISCS)
def test_discretize_dplr_matches_dense_reference(disc):
    """The solve-free DPLR discretisation (Woodbury / Taylor expm) == the dense reference."""
    lam, p, b, _ = ssm_math.hippo_legs_nplr(16)
    dt = np.array([1e-3, 3e-2, 1e-1])
    lam, p, b = (np.stack([v] * 3) for v in (lam, p, b))
    with jax.enable_x64(True):
        args = [jnp.asarray(v) for v in (lam, p, b)]
        da, db = ssm_math.discretize_dplr(*args, jnp.asarray(dt), disc)
        a_f, b_f = ssm_math.dplr_dense(*args)
        for h in range(3):
            ref_a, ref_b = _np_discretize(np.asarray(a_f[h]), np.asarray(b_f[h]), dt[h], disc)
            assert_close_f64(da[h], ref_a, f"dA {disc} h={h}")
            assert_close_f64(db[h], ref_b, f"dB {disc} h={h}")


def test_dplr_stack_runs_without_lapack_deadlock():
    """A 2-layer full-S4 stack at d_state 64 finishes on CPU (batched complex LU in two XLA
    threads at once used to deadlock here). Run in a child process so a hang fails, not hangs."""
    code = (
        "import jax, jax.numpy as jnp\n"
        "from hiss_jax.models.s4 import S4Stack\n"
        "m = S4Stack(d_model=16, n_layers=2, dropout=0.0)\n"
        "x = jnp.ones((2, 10, 16))\n"
        "p = m.init(jax.random.PRNGKey(0), x)\n"
        "g = jax.jit(jax.grad(lambda p: m.apply(p, x).sum()))(p)\n"
        "assert all(bool(jnp.isfinite(v).all()) for v in jax.tree_util.tree_leaves(g))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=240)
