"""Tests of rys_forge.rank.metrics against independent references (explicit Gram matrices, numpy,
scipy, sklearn, torch.distributions, full autograd Jacobians)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from rys_forge.divergence import kl_from_logits
from rys_forge.rank import metrics as M
from rys_forge.rank.metrics import cka as cka_module

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _correlated(n: int = 120, dx: int = 12, dy: int = 9, seed: int = 0):
    """Two representations of the same tokens sharing part of their signal, with offsets."""
    g = _gen(seed)
    base = torch.randn(n, 6, generator=g, dtype=F64)
    x = base @ torch.randn(6, dx, generator=g, dtype=F64)
    x = x + 0.5 * torch.randn(n, dx, generator=g, dtype=F64)
    y = torch.tanh(base @ torch.randn(6, dy, generator=g, dtype=F64))
    y = y + 0.7 * torch.randn(n, dy, generator=g, dtype=F64)
    return x + 3.0, y - 1.5


# ----------------------------------------------------------------------------- references


def _ref_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with HSIC = tr(K H L H) (Gram form)."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h)

    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def _ref_hsic1(k: np.ndarray, l: np.ndarray) -> float:
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    return (
        np.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ kt @ lt @ one)
    ) / (n * (n - 3))


def _ref_debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    k, l = x @ x.T, y @ y.T
    return _ref_hsic1(k, l) / math.sqrt(_ref_hsic1(k, k) * _ref_hsic1(l, l))


# ----------------------------------------------------------------------------- CKA


def test_linear_cka_matches_gram_hsic_formula():
    x, y = _correlated()
    got = M.linear_cka(x, y)
    want = _ref_linear_cka(x.numpy(), y.numpy())
    assert 0.05 < want < 0.95
    assert got == pytest.approx(want, rel=1e-10)
    assert M.linear_cka(x.float(), y.float()) == pytest.approx(want, rel=1e-5)  # float32 input


def test_linear_cka_small_n_sample_space_path():
    # N < d_x and N < d_y takes the N x N branch of the cross product.
    x, y = _randn(20, 40, seed=1), _randn(20, 30, seed=2)
    y = y + 0.5 * x[:, :30]
    assert M.linear_cka(x, y) == pytest.approx(_ref_linear_cka(x.numpy(), y.numpy()), rel=1e-10)


def test_linear_cka_invariances():
    x, y = _correlated(seed=3)
    base = M.linear_cka(x, y)
    q, _ = torch.linalg.qr(_randn(x.shape[1], x.shape[1], seed=4))
    assert M.linear_cka(x @ q, y) == pytest.approx(base, rel=1e-10)
    assert M.linear_cka(7.5 * x, 0.01 * y) == pytest.approx(base, rel=1e-10)
    assert M.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert M.linear_cka(x, x @ q * 3.0 + 2.0) == pytest.approx(1.0, abs=1e-12)
    # An ill-conditioned, non-orthogonal invertible map changes CKA by a clear margin.
    u, _ = torch.linalg.qr(_randn(x.shape[1], x.shape[1], seed=5))
    w, _ = torch.linalg.qr(_randn(x.shape[1], x.shape[1], seed=6))
    s = torch.logspace(0, 3, x.shape[1], dtype=F64)
    a = u @ torch.diag(s) @ w
    assert torch.linalg.matrix_rank(a) == x.shape[1]
    assert abs(M.linear_cka(x @ a, y) - base) > 0.1


def test_debiased_cka_matches_explicit_gram_formula():
    x, y = _correlated(n=80, seed=7)
    got = M.debiased_cka(x, y)
    want = _ref_debiased_cka(x.numpy(), y.numpy())  # uncentred, as the formula states
    assert got == pytest.approx(want, rel=1e-9)
    assert M.debiased_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    # independent data: debiased CKA near 0, while biased CKA is inflated by d/N
    xi, yi = _randn(60, 30, seed=8), _randn(60, 30, seed=9)
    assert abs(M.debiased_cka(xi, yi)) < 0.1
    assert M.linear_cka(xi, yi) > 0.3


def test_cka_matrix_matches_pairwise():
    g = _gen(10)
    layers = [torch.randn(64, 10, generator=g, dtype=F64)]
    for _ in range(4):
        mix = torch.randn(10, 10, generator=g, dtype=F64)
        layers.append(layers[-1] + 0.6 * torch.tanh(layers[-1] @ mix))
    layers = [layer.float() for layer in layers]
    for debiased, fn in ((False, M.linear_cka), (True, M.debiased_cka)):
        mat = M.cka_matrix(layers, debiased=debiased)
        assert mat.shape == (5, 5) and mat.dtype == F64
        assert torch.equal(mat, mat.T)
        assert torch.all(torch.diagonal(mat) == 1.0)
        for a in range(5):
            for b in range(a + 1, 5):
                assert mat[a, b].item() == pytest.approx(fn(layers[a], layers[b]), rel=1e-12)
    stacked = M.cka_matrix(torch.stack(layers))
    assert torch.allclose(stacked, M.cka_matrix(layers))


def test_cka_matrix_token_gram_path_matches_pairwise():
    """Few tokens, wide layers: the matrix comes from token Grams; same numbers as the pairwise
    formula, and a constant layer gives NaN in its row and column."""
    g = _gen(12)
    layers = [torch.randn(12, 40, generator=g, dtype=F64) for _ in range(3)]
    layers.append(layers[0] + 0.3 * torch.randn(12, 40, generator=g, dtype=F64))
    layers.append(torch.ones(12, 40, dtype=F64))
    mat = M.cka_matrix(layers)
    for a in range(4):
        for b in range(4):
            want = 1.0 if a == b else _ref_linear_cka(layers[a].numpy(), layers[b].numpy())
            assert mat[a, b].item() == pytest.approx(want, rel=1e-10)
    assert torch.isnan(mat[4]).all() and torch.isnan(mat[:, 4]).all()


def test_cka_matrix_on_demand_centring_and_tf32_flag(monkeypatch):
    """Past the memory budget the layers are re-centred on demand: same numbers. The TF32 switch
    (a no-op on CPU) is restored on exit."""
    g = _gen(11)
    layers = [torch.randn(50, 8, generator=g, dtype=F64) @ torch.randn(8, 8, generator=g, dtype=F64) + 3.0 for _ in range(4)]
    # independent reference: the formula on each pair, float64
    held = torch.tensor([[_ref_linear_cka(a.numpy(), b.numpy()) for b in layers] for a in layers], dtype=F64)
    monkeypatch.setattr(cka_module, "CKA_HOLD_BYTES", 0)
    assert torch.allclose(M.cka_matrix(layers), held, rtol=1e-10, atol=0)
    before = torch.backends.cuda.matmul.fp32_precision
    fast = M.cka_matrix([x.float() for x in layers], dtype=torch.float32, tf32=True)
    assert torch.backends.cuda.matmul.fp32_precision == before
    assert torch.allclose(fast.double(), held, atol=1e-6)


def test_cka_input_errors():
    with pytest.raises(ValueError, match="N=10 vs N=11"):
        M.linear_cka(torch.zeros(10, 3), torch.zeros(11, 3))
    with pytest.raises(ValueError, match="2-D"):
        M.linear_cka(torch.zeros(2, 10, 3), torch.zeros(2, 10, 3))
    with pytest.raises(ValueError, match="at least 4"):
        M.debiased_cka(torch.randn(3, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"xs\[1\] has N=5"):
        M.cka_matrix([torch.randn(4, 2), torch.randn(5, 2)])
    with pytest.raises(ValueError, match="empty"):
        M.cka_matrix([])
    with pytest.raises(ValueError, match=r"xs\[0\] needs at least 4"):
        M.cka_matrix([torch.randn(3, 2), torch.randn(3, 2)], debiased=True)
    assert math.isnan(M.linear_cka(torch.ones(10, 3), torch.randn(10, 3)))


# ----------------------------------------------------------------------------- steps, force


def test_relative_step_and_frobenius_cosine():
    z = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    z1 = torch.tensor([[3.0, 1.0], [0.0, 4.0]])
    assert M.relative_step(z, z1) == pytest.approx(1.0 / 5.0)
    a, b = _randn(7, 5, seed=11), _randn(7, 5, seed=12)
    an, bn = a.numpy(), b.numpy()
    want = float(np.sum(an * bn) / (np.linalg.norm(an) * np.linalg.norm(bn)))
    assert M.frobenius_cosine(a, b) == pytest.approx(want, rel=1e-12)
    assert math.isnan(M.relative_step(torch.zeros(3), torch.ones(3)))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        M.relative_step(torch.zeros(3), torch.ones(4))


def test_residual_force_hand_built():
    # x_i = [[1, 0], [0, 0]] (norm 1), S = [[0, 1], [0, 0]] (orthogonal, norm 1)
    x_i = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    x_j = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    f = M.residual_force(x_i, x_j)
    assert f.rho == pytest.approx(1.0)
    assert f.cos_phi == pytest.approx(0.0, abs=1e-15)
    assert f.raw_cosine == pytest.approx(1.0 / math.sqrt(2.0))
    # S = -0.5 x_i  -> rho 0.5, cos_phi -1, x_j parallel to x_i -> C = 1
    g = M.residual_force(torch.tensor([2.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]))
    assert (g.rho, g.cos_phi, g.raw_cosine) == pytest.approx((0.5, -1.0, 1.0))
    # S = [3, 4] against x_i = [1, 0]: rho 5, cos_phi 3/5; x_j = [4, 4] -> C = 4/sqrt(32)
    h = M.residual_force(torch.tensor([1.0, 0.0]), torch.tensor([4.0, 4.0]))
    assert (h.rho, h.cos_phi, h.raw_cosine) == pytest.approx((5.0, 0.6, 4.0 / math.sqrt(32.0)))
    same = M.residual_force(x_i, x_i)
    assert same.rho == 0.0 and math.isnan(same.cos_phi) and same.raw_cosine == 1.0


@pytest.mark.parametrize("seed", [13, 14, 15])
def test_closed_form_cosine_equals_direct_cosine(seed):
    x_i = _randn(30, 8, seed=seed) + 2.0
    x_j = x_i + (seed - 13.5) * _randn(30, 8, seed=seed + 100)
    f = M.residual_force(x_i, x_j)
    xi, xj = x_i.numpy().ravel(), x_j.numpy().ravel()
    direct = float(xi @ xj / (np.linalg.norm(xi) * np.linalg.norm(xj)))
    assert f.raw_cosine == pytest.approx(direct, rel=1e-12)
    assert M.raw_cosine_closed_form(f.rho, f.cos_phi) == pytest.approx(direct, rel=1e-12)


def test_stationarity():
    z0 = torch.tensor([0.0, 0.0])
    z1 = torch.tensor([1.0, 0.0])
    z2 = torch.tensor([1.0, 2.0])
    s = M.stationarity(z0, z1, z2)
    assert s.norm_ratio == pytest.approx(2.0)
    assert s.cosine == pytest.approx(0.0, abs=1e-15)
    z2b = torch.tensor([0.5, 0.0])  # S1 = -0.5 S0
    s = M.stationarity(z0, z1, z2b)
    assert (s.norm_ratio, s.cosine) == pytest.approx((0.5, -1.0))
    assert math.isnan(M.stationarity(z0, z0, z1).norm_ratio)


# ----------------------------------------------------------------------------- MMD


def _ref_mmd2(xs: np.ndarray, ys: np.ndarray) -> tuple[float, float]:
    """Brute force: loops for distances, median over all distinct pooled pairs, U-statistic."""
    pooled = np.concatenate([xs, ys])
    p = len(pooled)
    dist = np.zeros((p, p))
    for a in range(p):
        for b in range(p):
            dist[a, b] = math.sqrt(float(np.sum((pooled[a] - pooled[b]) ** 2)))
    sigma = float(np.median(dist[np.triu_indices(p, k=1)]))
    kern = np.exp(-(dist**2) / (2.0 * sigma**2))
    m, n = len(xs), len(ys)
    kxx, kyy, kxy = kern[:m, :m], kern[m:, m:], kern[:m, m:]
    total = 0.0
    for a in range(m):
        for b in range(m):
            if a != b:
                total += kxx[a, b] / (m * (m - 1))
    for a in range(n):
        for b in range(n):
            if a != b:
                total += kyy[a, b] / (n * (n - 1))
    total -= 2.0 * kxy.sum() / (m * n)
    return total, sigma


def test_mmd2_matches_brute_force_with_same_subsample():
    x = _randn(90, 6, seed=20)
    y = _randn(70, 6, seed=21) * 1.3 + 0.4
    res = M.mmd2_rbf(x, y, max_samples=40, generator=_gen(5))
    # reproduce the subsample: x first, then y, from the same generator
    g = _gen(5)
    ix = torch.randperm(90, generator=g)[:40]
    iy = torch.randperm(70, generator=g)[:40]
    want, sigma = _ref_mmd2(x[ix].numpy(), y[iy].numpy())
    assert (res.n_x, res.n_y) == (40, 40)
    assert res.bandwidth == pytest.approx(sigma, rel=1e-12)
    assert res.mmd2 == pytest.approx(want, rel=1e-10, abs=1e-14)
    # no subsampling when the sample fits; odd pooled-pair count exercises the other median branch
    full = M.mmd2_rbf(x[:13], y[:12], max_samples=None)
    want_full, sigma_full = _ref_mmd2(x[:13].numpy(), y[:12].numpy())
    assert full.bandwidth == pytest.approx(sigma_full, rel=1e-12)
    assert full.mmd2 == pytest.approx(want_full, rel=1e-10)


def test_mmd2_same_vs_shifted_distribution():
    x = _randn(600, 8, seed=22)
    y_same = _randn(600, 8, seed=23)
    y_shift = _randn(600, 8, seed=24) + 0.5
    same = M.mmd2_rbf(x, y_same, max_samples=400, seed=1).mmd2
    shifted = M.mmd2_rbf(x, y_shift, max_samples=400, seed=1).mmd2
    assert abs(same) < 0.01
    assert shifted > 0.05
    assert shifted > 10 * abs(same)
    # deterministic given the seed; the global RNG is untouched
    state = torch.random.get_rng_state()
    again = M.mmd2_rbf(x, y_shift, max_samples=400, seed=1).mmd2
    assert again == shifted
    assert torch.equal(state, torch.random.get_rng_state())


def test_mmd2_input_errors():
    with pytest.raises(ValueError, match="d=3 features but y has d=4"):
        M.mmd2_rbf(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="at least 2 rows"):
        M.mmd2_rbf(torch.randn(1, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="bandwidth"):
        M.mmd2_rbf(torch.randn(5, 3), torch.randn(5, 3), bandwidth=0.0)


# ----------------------------------------------------------------------------- Mahalanobis


@pytest.mark.parametrize("n,d", [(200, 10), (30, 50)])
def test_ledoit_wolf_matches_sklearn(n, d):
    sk = pytest.importorskip("sklearn.covariance")
    g = _gen(30)
    x = torch.randn(n, d, generator=g, dtype=F64) @ torch.randn(d, d, generator=g, dtype=F64) + 1.0
    cov_ref, s_ref = sk.ledoit_wolf(x.numpy())
    sc = M.shrunk_covariance(x)
    assert M.ledoit_wolf_shrinkage(x) == pytest.approx(s_ref, rel=1e-10)
    assert sc.shrinkage == pytest.approx(s_ref, rel=1e-10)
    np.testing.assert_allclose(sc.covariance.numpy(), cov_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n,d", [(200, 10), (30, 50)])
def test_mahalanobis_matches_scipy(n, d):
    g = _gen(31)
    x = torch.randn(n, d, generator=g, dtype=F64) * torch.linspace(0.5, 3.0, d, dtype=F64)
    y = torch.randn(40, d, generator=g, dtype=F64) + 0.3
    res = M.mahalanobis_shift(x.float(), y.float())
    # independent reference: shrunk covariance built by hand in numpy, scipy distances
    xn, yn = x.float().double().numpy(), y.float().double().numpy()
    mean = xn.mean(axis=0)
    emp = np.cov(xn, rowvar=False, bias=True)
    s = res.shrinkage
    assert 0.0 < s < 1.0
    cov = (1 - s) * emp + s * np.trace(emp) / d * np.eye(d)
    vi = np.linalg.inv(cov)
    want = np.mean([scipy.spatial.distance.mahalanobis(row, mean, vi) for row in yn])
    want_ref = np.mean([scipy.spatial.distance.mahalanobis(row, mean, vi) for row in xn])
    assert res.mean_distance == pytest.approx(want, rel=1e-8)
    assert res.reference_mean_distance == pytest.approx(want_ref, rel=1e-8)
    assert (res.n_x, res.n_y) == (n, 40)
    # the TF32 path (explicit inverse factor, one matmul) gives the same distances
    fast = M.mahalanobis_shift(x.float(), y.float(), reference=M.mahalanobis_reference(x.float(), tf32=True))
    assert fast.mean_distance == pytest.approx(want, rel=1e-8)
    assert fast.reference_mean_distance == pytest.approx(want_ref, rel=1e-8)
    # Cholesky solve agrees with scipy's cho_solve on a row
    c = scipy.linalg.cho_factor(cov)
    diff = yn[0] - mean
    assert math.sqrt(diff @ scipy.linalg.cho_solve(c, diff)) == pytest.approx(
        scipy.spatial.distance.mahalanobis(yn[0], mean, vi), rel=1e-10
    )
    try:  # the shrinkage itself against sklearn, when available
        from sklearn.covariance import ledoit_wolf
    except ImportError:
        pass
    else:
        assert s == pytest.approx(ledoit_wolf(xn)[1], rel=1e-8)


def test_mahalanobis_fixed_shrinkage_and_shift_ordering():
    x = _randn(300, 5, seed=32)
    near = M.mahalanobis_shift(x, _randn(300, 5, seed=33), shrinkage=0.0)
    far = M.mahalanobis_shift(x, _randn(300, 5, seed=34) + 2.0, shrinkage=0.0)
    assert near.shrinkage == 0.0
    assert near.mean_distance < far.mean_distance - 1.0
    # singular covariance without shrinkage -> nan, not an exception
    singular = M.mahalanobis_shift(_randn(5, 8, seed=35), _randn(3, 8, seed=36), shrinkage=0.0)
    assert math.isnan(singular.mean_distance)
    assert M.ledoit_wolf_shrinkage(x[:, :1]) == 0.0
    sub = M.mahalanobis_shift(x, x, max_samples=50, seed=3)
    assert (sub.n_x, sub.n_y) == (50, 50)
    with pytest.raises(ValueError, match="shrinkage"):
        M.mahalanobis_shift(x, x, shrinkage=1.5)


# ----------------------------------------------------------------------------- quadratic fit


def test_quadratic_fit_exact_and_vs_polyfit():
    n = [1, 2, 3, 4]
    y = [0.3 * k * k - 0.2 * k + 0.05 for k in n]
    fit = M.quadratic_fit(y, n)
    assert (fit.a, fit.b, fit.c) == pytest.approx((0.3, -0.2, 0.05), abs=1e-12)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    pure = M.quadratic_fit([0.01 * k * k for k in n])  # default n = 1..4
    assert pure.a_pure == pytest.approx(0.01, rel=1e-12)
    assert pure.r2_pure == pytest.approx(1.0, abs=1e-12)
    assert (pure.a, pure.b, pure.c) == pytest.approx((0.01, 0.0, 0.0), abs=1e-12)
    noisy = [0.02, 0.09, 0.16, 0.35]
    got = M.quadratic_fit(torch.tensor(noisy, dtype=F64), torch.tensor(n))
    coef = np.polyfit(n, noisy, 2)
    assert (got.a, got.b, got.c) == pytest.approx(tuple(coef), rel=1e-10)
    resid = np.array(noisy) - np.polyval(coef, n)
    r2 = 1 - np.sum(resid**2) / np.sum((np.array(noisy) - np.mean(noisy)) ** 2)
    assert got.r2 == pytest.approx(r2, rel=1e-10)
    n2 = np.array(n, dtype=float) ** 2
    a_ref = np.linalg.lstsq(n2[:, None], np.array(noisy), rcond=None)[0][0]
    yn = np.array(noisy)
    r2_ref = 1 - np.sum((yn - a_ref * n2) ** 2) / np.sum((yn - yn.mean()) ** 2)
    assert got.a_pure == pytest.approx(a_ref, rel=1e-12)
    assert got.r2_pure == pytest.approx(r2_ref, rel=1e-10)


def test_quadratic_fit_degenerate():
    flat = M.quadratic_fit([0.1, 0.1, 0.1, 0.1])
    assert math.isnan(flat.r2) and math.isnan(flat.r2_pure)
    assert flat.c == pytest.approx(0.1)
    with pytest.raises(ValueError, match="3 distinct"):
        M.quadratic_fit([1.0, 2.0, 3.0], [1, 1, 2])
    with pytest.raises(ValueError, match="n has 3 values but y has 4"):
        M.quadratic_fit([1.0, 2.0, 3.0, 4.0], [1, 2, 3])


# ----------------------------------------------------------------------------- KL


def test_kl_matches_torch_distributions():
    lp = _randn(2, 5, 11, seed=40, dtype=torch.float32) * 3
    lq = lp + 0.5 * _randn(2, 5, 11, seed=41, dtype=torch.float32)
    want = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=lp.double()),
        torch.distributions.Categorical(logits=lq.double()),
    )
    got = kl_from_logits(lp, lq)
    assert got.shape == (2, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    got64 = kl_from_logits(lp.half(), lq.half(), dtype=F64)
    want64 = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=lp.half().double()),
        torch.distributions.Categorical(logits=lq.half().double()),
    )
    torch.testing.assert_close(got64, want64, rtol=1e-12, atol=1e-14)
    assert torch.all(kl_from_logits(lp, lp) == 0)
    masked = lp.clone()
    masked[..., 0] = -math.inf
    assert torch.isfinite(kl_from_logits(masked, lq)).all()
    with pytest.raises(ValueError, match="logits_q has shape"):
        kl_from_logits(lp, lq[..., :10])


# ----------------------------------------------------------------------------- Jacobian


# torch.func.jvp loads torch's jvp decompositions through torch.jit.script on first use, which
# warns on recent torch; that is torch's own business, not ours.
JIT_WARNING = "ignore:`torch.jit.script` is deprecated:DeprecationWarning"


def _full_svdvals(fn, z0):
    jac = torch.autograd.functional.jacobian(fn, z0)
    return torch.linalg.svdvals(jac.reshape(z0.numel(), z0.numel()))


@pytest.mark.filterwarnings(JIT_WARNING)
def test_top_singular_values_nonlinear_map():
    w = _randn(4, 4, seed=50)
    z0 = _randn(5, 4, seed=51)

    def fn(z):
        return z + 0.1 * torch.tanh(z @ w)

    ref = _full_svdvals(fn, z0)
    res = M.top_singular_values(fn, z0, k=3, iters=300, tol=1e-12)
    assert res.values.shape == (3,) and res.values.dtype == F64
    assert torch.all(res.values[:-1] >= res.values[1:])
    assert torch.max(torch.abs(res.values - ref[:3]) / ref[:3]).item() < 1e-4
    assert 1 <= res.iterations <= 300


@pytest.mark.filterwarnings(JIT_WARNING)
def test_top_singular_values_spectral_gap_converges_early():
    g = _gen(52)
    q1, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=F64))
    q2, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=F64))
    tail = torch.linspace(0.5, 0.1, 21, dtype=F64)
    s = torch.cat([torch.tensor([10.0, 5.0, 2.5], dtype=F64), tail])
    a = q1 @ torch.diag(s) @ q2.T
    z0 = torch.randn(2, 3, 4, generator=g, dtype=F64) * 0.1  # any shape, flattened internally

    def fn(z):
        flat = z.reshape(-1)
        return (a.to(z.dtype) @ flat + 0.01 * torch.sin(flat)).reshape(z.shape)

    ref = _full_svdvals(fn, z0)
    res = M.top_singular_values(fn, z0, k=3, iters=100, tol=1e-10, generator=_gen(0))
    assert res.converged and res.iterations < 100
    assert torch.max(torch.abs(res.values - ref[:3]) / ref[:3]).item() < 1e-6
    # float32 path and a non-square output (R^{24} -> R^{12})
    res32 = M.top_singular_values(fn, z0.float(), k=2, iters=60)
    assert torch.allclose(res32.values, ref[:2], rtol=1e-4)
    b = a[:12]
    res_rect = M.top_singular_values(lambda z: b @ z.reshape(-1), z0, k=2, iters=200, tol=1e-12)
    torch.testing.assert_close(res_rect.values, torch.linalg.svdvals(b)[:2], rtol=1e-8, atol=0)
    # an fn whose output dtype differs from its input's (cotangents follow the output dtype)
    res_up = M.top_singular_values(lambda z: fn(z.double()), z0.float(), k=1, iters=60, tol=1e-9)
    assert res_up.values[0].item() == pytest.approx(ref[0].item(), rel=1e-5)
    with pytest.raises(ValueError, match="k must be in"):
        M.top_singular_values(fn, z0, k=25)
    with pytest.raises(ValueError, match="iters"):
        M.top_singular_values(fn, z0, iters=0)
