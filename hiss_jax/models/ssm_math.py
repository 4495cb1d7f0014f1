"""Pure SSM math for S4 (DPLR / NPLR) and S4D (diagonal) layers, and Mamba's discretisations.

Shape legend: H channels (one SSM each), N state size of the real system, N2 = N // 2 the
conjugate-pair representatives actually stored, L kernel / sequence length, B batch.

Conventions (S4, Gu et al. 2022, arXiv 2111.00396; S4D, Gu et al. 2022, arXiv 2206.11893):
  continuous  x'(t) = A x(t) + B u(t),  y(t) = C x(t) + D u(t)                     (S4 eq. 1)
  discrete    x_k = A_bar x_{k-1} + B_bar u_k,  y_k = C x_k + D u_k                (S4 eq. 3)
  kernel      K_k = C A_bar^k B_bar,  y = K * u + D u                              (S4 eq. 4-5)

The real N-dimensional system is stored in the eigenbasis of the normal part of HiPPO-LegS,
where it is complex and conjugate-symmetric: state (x, conj x), A = diag(Lambda, conj Lambda)
- p p^* with p = (P, conj P), B_full = (B, conj B), C_full = (C, conj C). Only the first half
(N2 entries) is stored and the conjugate half is implicit, so C_full x_full = 2 Re(C x).
Note that the rank-1 term couples the two halves: the "conj" Cauchy kernel below sums over
both, which keeps the system exactly the real HiPPO-LegS one at initialisation.

Discretisations (DISCRETIZATIONS), with step dt (S4 eq. 3; Gu & Dao 2023, eq. 4, Sec. 3.5):
  'bilinear'    A_bar = (I - dt/2 A)^{-1} (I + dt/2 A),  B_bar = (I - dt/2 A)^{-1} dt B
  'zoh'         A_bar = exp(dt A),  B_bar = A^{-1} (exp(dt A) - I) B  (exact zero-order hold)
  'approx_zoh'  A_bar = exp(dt A),  B_bar = dt B  (what `kernels.selective_scan` computes)

S4 defaults to 'bilinear', Mamba to 'approx_zoh' (`selective_scan_disc` below runs all three).

Everything here is a pure function of arrays (no flax); math runs in complex64 for float32
inputs (complex128 under x64), i.e. float32 accumulation.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

DISCRETIZATIONS = ("bilinear", "zoh", "approx_zoh")


def _full_precision(fn):
    """Trace `fn` with float32-exact matmuls: on GPUs the default lets XLA use TF32 (10-bit
    mantissa), which would wreck A_bar^L, the Krylov powers and the expm of ||dt A|| ~ N^2/2."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapped


def _check_disc(disc: str) -> None:
    if disc not in DISCRETIZATIONS:
        raise ValueError(f"{disc=} is not a known discretisation; use one of {DISCRETIZATIONS}")


# --------------------------------------------------------------------------------------------
# HiPPO initialisation
# --------------------------------------------------------------------------------------------
def hippo_legs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense HiPPO-LegS matrices (HiPPO, Gu et al. 2020, eq. 2 / S4 eq. 2), float64.

    A: (n, n)  B: (n,)
    A_nk = -sqrt(2n+1) sqrt(2k+1) for n > k, -(n+1) for n = k, 0 for n < k;  B_n = sqrt(2n+1).
    """
    if n < 1:
        raise ValueError(f"{n=} must be a positive state size")
    q = np.sqrt(2.0 * np.arange(n) + 1.0)
    a = -np.tril(np.outer(q, q), -1) - np.diag(np.arange(n) + 1.0)
    return a, q.copy()


def hippo_legs_nplr(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """NPLR form of HiPPO-LegS, conjugate half kept (S4 Theorem 1 / Corollary 1), complex128.

    Lambda, P, B: (n // 2,)   V: (n, n // 2)
    With p = sqrt(k + 1/2), A_LegS + p p^T = S is normal (-1/2 I + skew-symmetric), so
    S = V_f diag(Lambda_f) V_f^* with V_f = [V, conj V] unitary, Lambda_f = [Lambda, conj Lambda]
    and A_LegS = V_f (diag(Lambda_f) - P_f P_f^*) V_f^*, P_f = V_f^* p = (P, conj P),
    B_f = V_f^* b = (B, conj B). Every Lambda has real part -1/2 and positive imaginary part.
    """
    if n < 2 or n % 2:
        raise ValueError(f"d_state={n} must be even and >= 2 (conjugate pairs are stored)")
    a, b = hippo_legs(n)
    p = np.sqrt(np.arange(n) + 0.5)
    skew = a + np.outer(p, p) + 0.5 * np.eye(n)
    # -i * skew is Hermitian, so eigh gives an orthonormal basis and real frequencies.
    w, v = np.linalg.eigh(-1j * skew)
    order = np.argsort(-w)[: n // 2]
    if not np.all(w[order] > 1e-6 * max(1.0, np.abs(w).max())):
        raise ValueError(f"HiPPO-LegS with n={n} has a zero frequency; cannot pair conjugates")
    w, v = w[order], v[:, order]
    lam = -0.5 + 1j * w
    vh = v.conj().T
    return lam, vh @ p, vh @ b, v


def s4d_init(n: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Diagonal S4D initialisations (S4D paper, Sec. 4 and eq. 9-10), complex128.

    Lambda, B: (n // 2,)
    'legs': Lambda, B of the NPLR form of HiPPO-LegS with the low-rank term dropped (S4D-LegS).
    'lin':  Lambda_k = -1/2 + i pi k, B = 1 (S4D-Lin).
    'inv':  Lambda_k = -1/2 + i (n/pi) (n/(2k+1) - 1), B = 1 (S4D-Inv).
    """
    kinds = ("legs", "lin", "inv")
    if kind not in kinds:
        raise ValueError(f"diag_init={kind!r} is not a known S4D init; use one of {kinds}")
    if n < 2 or n % 2:
        raise ValueError(f"d_state={n} must be even and >= 2 (conjugate pairs are stored)")
    if kind == "legs":
        lam, _, b, _ = hippo_legs_nplr(n)
        return lam, b
    k = np.arange(n // 2)
    if kind == "lin":
        imag = np.pi * k
    else:
        imag = n / np.pi * (n / (2 * k + 1) - 1)
    return -0.5 + 1j * imag, np.ones(n // 2, np.complex128)


@_full_precision
def dplr_dense(lam, p, b):
    """Conjugate-completed dense state matrix of a DPLR SSM in its eigenbasis.

    lam, p, b: (..., N2) complex  ->  A_f: (..., N, N)  B_f: (..., N),  N = 2 N2
    A_f = diag(Lambda, conj Lambda) - p_f p_f^*, p_f = (p, conj p)  (S4 eq. 6, rank 1, P = Q).
    """
    lam_f = jnp.concatenate([lam, jnp.conj(lam)], axis=-1)
    p_f = jnp.concatenate([p, jnp.conj(p)], axis=-1)
    b_f = jnp.concatenate([b, jnp.conj(b)], axis=-1)
    eye = jnp.eye(lam_f.shape[-1], dtype=lam_f.dtype)
    a_f = eye * lam_f[..., None, :] - p_f[..., :, None] * jnp.conj(p_f)[..., None, :]
    return a_f, b_f


# --------------------------------------------------------------------------------------------
# Discretisation
# --------------------------------------------------------------------------------------------
@_full_precision
def discretize_diag(lam, b, dt, disc: str):
    """Discretise a diagonal SSM elementwise (S4D paper, Sec. 3.1).

    lam, b: (..., N) complex   dt: broadcastable to (..., N)   ->  dA, dB: (..., N)
    bilinear: dA = (1 + dt/2 lam) / (1 - dt/2 lam),  dB = dt b / (1 - dt/2 lam)   (S4 eq. 3)
    zoh:      dA = exp(dt lam),  dB = (exp(dt lam) - 1) / lam * b
    approx_zoh: dA = exp(dt lam),  dB = dt b
    """
    _check_disc(disc)
    dtl = dt * lam
    if disc == "bilinear":
        denom = 1.0 - dtl / 2
        return (1.0 + dtl / 2) / denom, dt * b / denom
    if disc == "approx_zoh":
        return jnp.exp(dtl), dt * b
    # expm1 keeps (e^{dt lam} - 1)/lam accurate when |dt lam| is small.
    return jnp.exp(dtl), jnp.expm1(dtl) / lam * b


def expm_taylor(x, degree: int = 12, max_squarings: int = 16):
    """exp of a batch of square matrices by scaling and squaring a Taylor polynomial.

    x: (..., N, N)  ->  exp(x): (..., N, N)
    Matrix products only: `jax.scipy.linalg.expm` solves a Pade system through LAPACK, and
    batched complex LU calls running on two XLA CPU threads at once were seen to deadlock
    (jaxlib 0.10.2, 2 cores). Each matrix is scaled by 2^-s_i so its 1-norm is <= 1/2 (Taylor
    truncation error < 1e-13), then squared s_i times; the loop has a static trip count (so it
    differentiates) and skips the squarings a matrix does not need.
    """
    n = x.shape[-1]
    norm = jnp.max(jnp.sum(jnp.abs(x), axis=-2), axis=-1)
    s = jnp.clip(jnp.ceil(jnp.log2(jnp.maximum(norm, 1e-30) * 2.0)), 0, max_squarings)
    s = jax.lax.stop_gradient(s)
    xs = x / (2.0 ** s).astype(x.dtype)[..., None, None]
    eye = jnp.eye(n, dtype=x.dtype)
    r = eye
    for k in range(degree, 0, -1):  # Horner: I + X/1 (I + X/2 (I + ...))
        r = eye + (xs @ r) / k

    def square(i, r):
        return jnp.where((i < s)[..., None, None], r @ r, r)

    return jax.lax.fori_loop(0, max_squarings, square, r)


@_full_precision
def discretize_dense(a, b, dt, disc: str):
    """Discretise a dense SSM.

    a: (..., N, N)  b: (..., N)  dt: (...)  ->  dA: (..., N, N)  dB: (..., N)
    bilinear: dA = (I - dt/2 A)^{-1} (I + dt/2 A),  dB = (I - dt/2 A)^{-1} dt B     (S4 eq. 3)
    zoh:      dA = exp(dt A),  dB = int_0^dt exp(s A) ds B, both read off one matrix
              exponential of the augmented [[A, B], [0, 0]] dt (no inverse of A needed).
    approx_zoh: dA = exp(dt A),  dB = dt B.
    The S4 layer uses `discretize_dplr`, which needs no linear solve; this general form is the
    reference it is tested against.
    """
    _check_disc(disc)
    n = a.shape[-1]
    dt = jnp.asarray(dt)[..., None, None]
    eye = jnp.eye(n, dtype=a.dtype)
    if disc == "bilinear":
        lhs = eye - dt / 2 * a
        rhs = jnp.concatenate([eye + dt / 2 * a, dt * b[..., :, None]], axis=-1)
        sol = jnp.linalg.solve(lhs, rhs)
        return sol[..., :, :n], sol[..., :, n]
    if disc == "approx_zoh":
        return expm_taylor(a * dt), dt[..., 0] * b
    return _zoh_augmented(a, b, dt)


def _zoh_augmented(a, b, dt):
    n = a.shape[-1]
    top = jnp.concatenate([a, b[..., :, None]], axis=-1) * dt
    aug = jnp.concatenate([top, jnp.zeros_like(top[..., :1, :])], axis=-2)
    e = expm_taylor(aug)
    return e[..., :n, :n], e[..., :n, n]


@_full_precision
def discretize_dplr(lam, p, b, dt, disc: str):
    """Discretise a DPLR SSM into its dense conjugate-completed discrete matrices.

    lam, p, b: (..., N2) complex  dt: (...)  ->  dA: (..., N, N)  dB: (..., N),  N = 2 N2
    bilinear: (I - dt/2 A)^{-1} with A = diag(lam_f) - p_f p_f^* by the Woodbury identity
              (S4 Lemma C.4): M^{-1} = D^{-1} - (dt/2) D^{-1} p_f p_f^* D^{-1} / (1 + dt/2 p_f^* D^{-1} p_f),
              D = I - dt/2 diag(lam_f); no LAPACK solve (see `expm_taylor` for why).
    zoh:      the augmented matrix exponential, as in `discretize_dense`.
    approx_zoh: dA = exp(dt A) (Taylor, as `discretize_dense`),  dB = dt B.
    """
    _check_disc(disc)
    a_f, b_f = dplr_dense(lam, p, b)
    dt_c = jnp.asarray(dt).astype(a_f.dtype)
    if disc == "zoh":
        return _zoh_augmented(a_f, b_f, dt_c[..., None, None])
    if disc == "approx_zoh":
        return expm_taylor(a_f * dt_c[..., None, None]), dt_c[..., None] * b_f
    lam_f = jnp.concatenate([lam, jnp.conj(lam)], axis=-1)
    p_f = jnp.concatenate([p, jnp.conj(p)], axis=-1)
    half = (dt_c / 2)[..., None]
    d_inv = 1.0 / (1.0 - half * lam_f)
    u = p_f * d_inv
    w = jnp.conj(p_f) * d_inv
    denom = 1.0 + half[..., 0] * jnp.sum(jnp.conj(p_f) * u, axis=-1)
    eye = jnp.eye(a_f.shape[-1], dtype=a_f.dtype)
    m_inv = (eye * d_inv[..., None, :]
             - (half[..., 0] / denom)[..., None, None] * u[..., :, None] * w[..., None, :])
    da = m_inv @ (eye + half[..., None] * a_f)
    db = jnp.einsum("...nm,...m->...n", m_inv, dt_c[..., None] * b_f)
    return da, db


# --------------------------------------------------------------------------------------------
# Convolution kernels
# --------------------------------------------------------------------------------------------
@_full_precision
def cauchy_conj(v, alpha, beta, lam):
    """Conjugate-pair Cauchy sum.

    v, lam: (..., N2)   alpha, beta: (M,)   ->  (..., M)
    out_m = sum_n v_n / (alpha_m - beta_m lam_n) + conj(v_n) / (alpha_m - beta_m conj(lam_n)).
    (S4 Sec. 3.3: the Cauchy kernel over the full conjugate-symmetric state.)
    """
    a = alpha[:, None]
    bb = beta[:, None]
    v = v[..., None, :]
    lam = lam[..., None, :]
    terms = v / (a - bb * lam) + jnp.conj(v) / (a - bb * jnp.conj(lam))
    return terms.sum(-1)


@_full_precision
def dplr_kernel_bilinear(lam, p, b, c_tilde, dt, length: int):
    """S4 convolution kernel by Cauchy + Woodbury at the roots of unity (S4 Algorithm 1).

    lam, p, b, c_tilde: (H, N2) complex   dt: (H,)   ->  K: (H, L) real
    c_tilde is C~ = C (I - A_bar^L) (S4 Lemma C.2), for example from `dplr_c_tilde`.
    At omega = exp(-2 pi i m / L) the truncated generating function is
        K^(omega) = 2/(1+omega) C~ [g I - A]^{-1} B,  g = 2/dt (1-omega)/(1+omega)      (Lemma C.3)
    and with A = Lambda - p p^* the inverse is the Woodbury identity (Lemma C.4). This writes
    2/(1+omega)(g - lam)^{-1} = 1/((1-omega)/dt - (1+omega)/2 lam), finite at omega = -1
    (even L), giving K^ = k00 - beta k01 k10 / (1 + beta k11), beta = (1+omega)/2.
    K = irfft(K^, L).
    """
    if length < 1:
        raise ValueError(f"kernel {length=} must be >= 1")
    cdtype = lam.dtype
    m = jnp.arange(length // 2 + 1)
    omega = jnp.exp(-2j * jnp.pi * m / length).astype(cdtype)
    dt = dt[:, None].astype(cdtype)
    # One (alpha, beta) row per channel: alpha depends on that channel's dt.
    alpha = (1.0 - omega)[None, :] / dt  # (H, M)
    beta = (1.0 + omega) / 2  # (M,)

    def per_channel(lam_h, p_h, b_h, c_h, alpha_h):
        v = jnp.stack([c_h * b_h, c_h * p_h, jnp.conj(p_h) * b_h, jnp.conj(p_h) * p_h])
        k = cauchy_conj(v, alpha_h, beta, lam_h)  # (4, M)
        return k[0] - beta * k[1] * k[2] / (1.0 + beta * k[3])

    k_hat = jax.vmap(per_channel)(lam, p, b, c_tilde, alpha)
    return jnp.fft.irfft(k_hat, n=length, axis=-1)


@_full_precision
def dplr_c_tilde(lam, p, b, c, dt, length: int, disc: str = "bilinear"):
    """C~ = C (I - A_bar^L), the output row the generating-function kernel needs (S4 Lemma C.2).

    lam, p, b, c: (H, N2) complex   dt: (H,)   ->  C~: (H, N2) complex
    The stored C is the true output row; C~ is derived per kernel length, so the convolution and
    the recurrence (which uses C) agree for every length. A_bar^L by repeated squaring.
    """
    da, _ = discretize_dplr(lam, p, b, dt, disc)
    c_f = jnp.concatenate([c, jnp.conj(c)], axis=-1)
    ct = c_f - jnp.einsum("hn,hnm->hm", c_f, jnp.linalg.matrix_power(da, length))
    # The completed row stays conjugate-symmetric, so its first half represents it.
    return ct[..., : lam.shape[-1]]


@_full_precision
def dense_kernel(da, db, c, length: int):
    """Kernel of a dense discrete SSM by Krylov doubling: K_k = Re(C A_bar^k B_bar), k < L.

    da: (..., N, N)  db, c: (..., N)  ->  K: (..., L) real
    Doubling [v, A v, ..] with A^(2^j) takes log2(L) matrix products instead of L sequential steps.
    """
    v = db[..., :, None]
    a_pow = da
    while v.shape[-1] < length:
        v = jnp.concatenate([v, a_pow @ v], axis=-1)
        if v.shape[-1] < length:
            a_pow = a_pow @ a_pow
    v = v[..., :length]
    return jnp.real(jnp.einsum("...n,...nl->...l", c, v))


@_full_precision
def vandermonde_kernel(da, db, c, length: int):
    """S4D kernel by the Vandermonde product (S4D paper eq. 5), conjugate half implicit.

    da, db, c: (H, N2) complex  ->  K: (H, L) real,  K_k = 2 Re(sum_n c_n db_n da_n^k)
    Powers via exp(k log da) so that no sequential product is needed.
    """
    k = jnp.arange(length, dtype=jnp.real(da).dtype)
    powers = jnp.exp(jnp.log(da)[..., None] * k)  # (H, N2, L)
    return 2.0 * jnp.real(jnp.einsum("hn,hnl->hl", c * db, powers))


@_full_precision
def causal_fft_conv(u, k):
    """Causal convolution y_t = sum_{s<=t} K_s u_{t-s} by FFT of length 2L (no wrap-around).

    u: (B, L, H)  k: (H, L)  ->  y: (B, L, H), float32 accumulation.
    """
    length = u.shape[1]
    if k.shape != (u.shape[2], length):
        raise ValueError(f"kernel shape {k.shape} does not match (H, L) = {(u.shape[2], length)}")
    n = 2 * length
    uf = jnp.fft.rfft(u.astype(jnp.float32), n=n, axis=1)
    kf = jnp.fft.rfft(k.astype(jnp.float32), n=n, axis=-1)
    return jnp.fft.irfft(uf * kf.T[None], n=n, axis=1)[:, :length]


# --------------------------------------------------------------------------------------------
# Recurrent steps
# --------------------------------------------------------------------------------------------
@_full_precision
def diag_step(x, u, da, db, c):
    """One step of a diagonal discrete SSM with the conjugate half implicit (S4 eq. 3).

    x: (B, H, N2) complex  u: (B, H)  da, db, c: (H, N2)  ->  x': (B, H, N2), y: (B, H) real
    x' = da x + db u;  y = 2 Re(sum_n c_n x'_n)  (D u is added by the caller).
    """
    x = da * x + db * u[..., None]
    return x, 2.0 * jnp.real(jnp.einsum("hn,bhn->bh", c, x))


@_full_precision
def dense_half_step(x, u, da_top, db_top, c):
    """One step of a conjugate-symmetric dense discrete SSM kept as its first half.

    x: (B, H, N2) complex  u: (B, H)  da_top: (H, N2, N) = rows :N2 of A_bar
    db_top, c: (H, N2)  ->  x': (B, H, N2), y: (B, H) real
    x'_half = A_bar[:N2] (x, conj x) + B_bar[:N2] u; the second half stays conj(x'_half).
    """
    x_f = jnp.concatenate([x, jnp.conj(x)], axis=-1)
    x = jnp.einsum("hmn,bhn->bhm", da_top, x_f) + db_top * u[..., None]
    return x, 2.0 * jnp.real(jnp.einsum("hn,bhn->bh", c, x))


@_full_precision
def dplr_bilinear_step(x, u, lam, p, b, c, dt):
    """One bilinear step of the conjugate-completed DPLR SSM in O(N), no dense matrix.

    x: (B, H, N2) complex  u: (B, H)  lam, p, b, c: (H, N2)  dt: (H,)
    ->  x': (B, H, N2), y: (B, H) real                                   (S4 eq. 3, App. C.2)
    x' = (I - dt/2 A)^{-1} [(I + dt/2 A) x + dt B u] with A = Lambda_f - p_f p_f^*:
    the forward half is A x = Lambda x - p (p_f^* x_f), the backward half the Woodbury identity
    (D^{-1} + h p p^*)^{-1} = D - h D p (1 + h p^* D p)^{-1} p^* D, D = (1 - h Lambda)^{-1},
    h = dt/2. For a conjugate-symmetric vector v_f, p_f^* v_f = 2 Re(sum conj(p) v) is real.
    """
    h = (dt / 2)[:, None]
    pc = jnp.conj(p)

    def inner(w, v):  # conjugate-completed inner product w_f^* v_f over the state axis
        return 2.0 * jnp.real(jnp.sum(w * v, axis=-1, keepdims=True))

    v = x + h * (lam * x - p * inner(pc, x)) + 2 * h * b * u[..., None]
    d = 1.0 / (1.0 - h * lam)
    dv = d * v
    q = inner(pc, dv) / (1.0 + h * inner(pc, d * p))
    x = dv - h * d * p * q
    return x, 2.0 * jnp.real(jnp.einsum("hn,bhn->bh", c, x))


# --------------------------------------------------------------------------------------------
# Selective (Mamba) SSM under a discretisation
# --------------------------------------------------------------------------------------------
def discretize(dt, A, disc: str):
    """Elementwise discretisation of Mamba's diagonal, real A (module docstring, per (d, n)).

    dt: (..., Di, 1)  A: (Di, N)  ->  (A_bar, B_scale): (..., Di, N);  B_bar = B_scale * B.
    approx_zoh: (exp(dt A), dt);  zoh: (exp(dt A), expm1(dt A) / A);
    bilinear: ((1 + dt A/2) / (1 - dt A/2), dt / (1 - dt A/2)).
    """
    _check_disc(disc)
    dta = dt * A
    if disc == "approx_zoh":
        return jnp.exp(dta), jnp.broadcast_to(dt, dta.shape)
    if disc == "zoh":
        # expm1(dt A) / A == dt * expm1(x) / x with x = dt A: accurate as dt A -> 0.
        return jnp.exp(dta), jnp.expm1(dta) / A
    denom = 1.0 - dta / 2
    return (1.0 + dta / 2) / denom, dt / denom


def selective_scan_disc(u, delta, A, B, C, D=None, z=None, delta_bias=None, *,
                        delta_softplus=False, disc="approx_zoh", initial_state=None,
                        return_final_state=False):
    """The selective scan of `kernels.selective_scan` under any discretisation `disc`.

    u, delta, z: (B, L, Di)  A: (Di, N)  B, C: (B, L, N)  D, delta_bias: (Di,)
    initial_state: (B, Di, N).  Returns y (B, L, Di) in u's dtype [, h_L (B, Di, N) float32].
    dt = softplus(delta + delta_bias);  h_t = A_bar_t h_{t-1} + B_bar_t u_t;
    y_t = C_t . h_t + D u_t;  y *= silu(z)  (Gu & Dao 2023, Algorithm 2; A_bar, B_bar from
    `discretize`).  Exact ZOH and bilinear give a B_bar per (channel, state), which the kernel
    (one dt B_t per state) does not take, so this is a pure-JAX `jax.lax.associative_scan` that
    materialises (B, L, Di, N) float32; for 'approx_zoh' it equals `kernels.selective_scan`.
    """
    _check_disc(disc)
    if u.ndim != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (B, L, Di); got {u.shape=}, {delta.shape=}")
    b, l, di = u.shape
    if A.shape[0] != di or B.shape != (b, l, A.shape[1]) or C.shape != B.shape:
        raise ValueError(f"need A (Di={di}, N), B and C (B, L, N); got {A.shape=}, {B.shape=}, "
                         f"{C.shape=} (grouped B/C are not supported here)")
    f32 = jnp.result_type(jnp.float32, u.dtype)
    dt = delta.astype(f32)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(f32)
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    a, scale = discretize(dt[..., None], A.astype(f32), disc)  # (b, l, di, n)
    x = scale * (u.astype(f32)[..., None] * B.astype(f32)[:, :, None, :])
    if initial_state is not None:
        x = x.at[:, 0].add(a[:, 0] * initial_state.astype(f32))

    def combine(left, right):
        a1, x1 = left
        a2, x2 = right
        return a1 * a2, a2 * x1 + x2

    _, h = jax.lax.associative_scan(combine, (a, x), axis=1)
    y = jnp.einsum("bldn,bln->bld", h, C.astype(f32))
    if D is not None:
        y = y + D.astype(f32) * u.astype(f32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    y = y.astype(u.dtype)
    return (y, h[:, -1]) if return_final_state else y
