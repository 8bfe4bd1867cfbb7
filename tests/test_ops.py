"""Tests of the second-order ops in ``timm_gsop.layers.second_order``.

References are computed independently in float64 (``torch.cov``, eigendecompositions, a line-by-line
re-implementation of the released formulas, ``official_reference.py``). The ops compute in float32 for float32 and
lower-precision input, so those comparisons use float32-appropriate tolerances; float64 input stays
float64 inside the ops, so ``test_float64_gradcheck`` is a real gradcheck.
"""

import re

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from official_reference import released_channel_covariance, released_sqrtm, released_triu_index
from timm_gsop.layers import second_order
from timm_gsop.layers.second_order import (
    TRACE_EPS, covariance_pool, isqrt, position_gram, triu_indices_flat, triu_vectorize)

# float32 has a 2^-24 ~ 6e-8 unit roundoff; sums/products of up to a few hundred terms stay well under this
FP32_RTOL = 2e-5


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs error relative to the largest reference entry (norm-wise float32 accuracy)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / (scale if scale > 0 else 1.0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ref_covariance(x: torch.Tensor) -> torch.Tensor:
    """Per-sample biased covariance over positions, float64."""
    b, c = x.shape[:2]
    x = x.double()
    return torch.stack([torch.cov(x[i].reshape(c, -1), correction=0).reshape(c, c) for i in range(b)])


def _released_isqrt(x: torch.Tensor, iterations: int) -> torch.Tensor:
    return released_sqrtm(x.double(), iterations)


def _random_spd(b: int, n: int, lo: float, hi: float, seed: int, scale: float = 1.0) -> torch.Tensor:
    """float64 SPD matrices with eigenvalues uniform in [lo, hi] * scale."""
    g = _gen(seed)
    q, _ = torch.linalg.qr(torch.randn(b, n, n, generator=g, dtype=torch.float64))
    lam = lo + (hi - lo) * torch.rand(b, n, generator=g, dtype=torch.float64)
    return (q * (lam * scale).unsqueeze(1)) @ q.transpose(1, 2)


def _eig_sqrt(a: torch.Tensor) -> torch.Tensor:
    lam, v = torch.linalg.eigh(a.double())
    return (v * lam.clamp_min(0).sqrt().unsqueeze(1)) @ v.transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# covariance_pool
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('shape', [
    (2, 8, 7, 7), (3, 5, 4, 9), (1, 16, 9, 2), (2, 3, 1, 1), (2, 4, 1, 7), (1, 32, 14, 14), (2, 1, 3, 3),
])
def test_covariance_matches_float64_reference(shape):
    x = torch.randn(*shape, generator=_gen(sum(shape)))
    x[:, :, 0] += 3.0  # non-zero-mean features, like ReLU outputs
    out = covariance_pool(x)
    assert out.shape == (shape[0], shape[1], shape[1])
    assert out.dtype == torch.float32
    assert _rel_err(out, _ref_covariance(x)) < FP32_RTOL


def test_covariance_equals_released_centring_matrix_form():
    x = torch.rand(2, 6, 5, 3, generator=_gen(0)) * 4
    assert _rel_err(covariance_pool(x), released_channel_covariance(x.double())) < FP32_RTOL


def test_covariance_single_position_is_zero():
    # M = 1: every feature equals its mean, the biased covariance is exactly 0 (not NaN)
    x = torch.randn(3, 7, 1, 1, generator=_gen(1))
    out = covariance_pool(x)
    assert torch.equal(out, torch.zeros(3, 7, 7))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_covariance_output_is_float32_and_computed_in_float32(dtype):
    x = (torch.rand(2, 16, 6, 5, generator=_gen(2)) * 3).to(dtype)
    out = covariance_pool(x)
    assert out.dtype == torch.float32
    # reference from the *same* low-precision values: a float32 computation is accurate to ~1e-6, a
    # computation in fp16/bf16 would be off by ~1e-3 / 1e-2
    assert _rel_err(out, _ref_covariance(x)) < FP32_RTOL


@pytest.mark.parametrize('shape', [(4, 12, 5, 5), (2, 7, 3, 11), (2, 9, 2, 2)])
def test_covariance_is_symmetric_psd(shape):
    x = torch.relu(torch.randn(*shape, generator=_gen(3)))
    out = covariance_pool(x).double()
    assert torch.allclose(out, out.transpose(1, 2), rtol=0, atol=1e-6 * out.abs().max().item())
    eig = torch.linalg.eigvalsh(0.5 * (out + out.transpose(1, 2)))
    assert eig.min().item() >= -1e-5 * out.abs().max().item() * shape[1]


def test_covariance_rank_deficient_when_fewer_positions_than_channels():
    # M = 4 < C = 10: rank <= M - 1 = 3
    x = torch.randn(1, 10, 2, 2, generator=_gen(4))
    eig = torch.linalg.eigvalsh(covariance_pool(x).double())[0]
    assert (eig[:-3].abs() < 1e-5 * eig[-1]).all()
    assert (eig[-3:] > 1e-3).all()


class _RecordShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.numels.append((str(func), t.numel()))
        return out


def test_covariance_never_builds_an_m_by_m_matrix():
    # every intermediate tensor stays O(C * M): nothing close to M * M elements
    b, c, h, w = 2, 4, 32, 32
    m = h * w
    x = torch.randn(b, c, h, w, generator=_gen(5), requires_grad=True)
    with _RecordShapes() as rec:
        out = covariance_pool(x)
        out.sum().backward()
    biggest = max(n for _, n in rec.numels)
    assert biggest <= b * c * m, rec.numels
    assert biggest < m * m


def test_covariance_large_m_runs_without_m_by_m_memory():
    # M = 512 * 512 = 262,144: an (M, M) float32 centring matrix would need 256 GiB
    x = torch.rand(1, 4, 512, 512, generator=_gen(6))
    out = covariance_pool(x)
    assert _rel_err(out, _ref_covariance(x)) < 1e-4  # long float32 reductions


# --------------------------------------------------------------------------------------------------
# position_gram
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('shape', [(2, 16, 8, 8), (3, 5, 3, 7), (1, 64, 8, 8), (2, 7, 1, 1), (2, 1, 4, 2)])
def test_position_gram_formula(shape):
    b, c, h, w = shape
    p = h * w
    x = torch.randn(*shape, generator=_gen(7 + sum(shape)))
    out = position_gram(x)
    assert out.shape == (b, p, p) and out.dtype == torch.float32
    xd = x.double().reshape(b, c, p)
    s = xd.sum(dim=1)
    ref = xd.transpose(1, 2) @ xd / p - s.unsqueeze(2) * s.unsqueeze(1) / p ** 2
    assert _rel_err(out, ref) < FP32_RTOL
    # the released cov_feature: X^T I_hat X with a (d x d) I_hat whose coefficients use P
    i_hat = -1.0 / p / p * torch.ones(c, c, dtype=torch.float64) + 1.0 / p * torch.eye(c, dtype=torch.float64)
    assert _rel_err(out, xd.transpose(1, 2) @ i_hat @ xd) < FP32_RTOL


def test_position_gram_is_a_true_covariance_only_when_c_equals_p():
    # C == P == 16: the covariance of the P-dim position vectors over the C channel "samples"
    x = torch.randn(2, 16, 4, 4, generator=_gen(8))
    ref = torch.stack([torch.cov(x[i].double().reshape(16, 16).t(), correction=0) for i in range(2)])
    assert _rel_err(position_gram(x), ref) < FP32_RTOL
    # C != P: it is not (the 1/P normalisation is kept for checkpoint compatibility)
    x = torch.randn(1, 32, 4, 4, generator=_gen(9)) + 1.0
    ref = torch.cov(x[0].double().reshape(32, 16).t(), correction=0)
    assert _rel_err(position_gram(x)[0], ref) > 1e-2


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_position_gram_low_precision_input(dtype):
    x = torch.randn(2, 16, 8, 8, generator=_gen(10)).to(dtype)
    out = position_gram(x)
    assert out.dtype == torch.float32
    b, c, p = 2, 16, 64
    xd = x.double().reshape(b, c, p)
    s = xd.sum(dim=1)
    ref = xd.transpose(1, 2) @ xd / p - s.unsqueeze(2) * s.unsqueeze(1) / p ** 2
    assert _rel_err(out, ref) < FP32_RTOL


# --------------------------------------------------------------------------------------------------
# isqrt
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('n,scale', [(4, 1.0), (16, 1.0), (32, 1e3), (16, 1e-3), (1, 5.0)])
def test_isqrt_converges_to_eigen_sqrt(n, scale):
    a = _random_spd(3, n, 0.5, 2.0, seed=n, scale=scale)
    expected = _eig_sqrt(a)
    out = isqrt(a, num_iters=25)
    assert out.dtype == torch.float64  # float64 input is computed (and returned) in float64
    assert isqrt(a.float(), num_iters=25).dtype == torch.float32
    assert _rel_err(out, expected) < 1e-4
    if n > 1:  # (1x1: trace normalisation gives exactly 1, exact after any number of iterations)
        # and more iterations is better than few
        assert _rel_err(isqrt(a, num_iters=2), expected) > _rel_err(out, expected)


def test_isqrt_squares_back_to_input():
    a = _random_spd(2, 24, 0.2, 3.0, seed=11)
    y = isqrt(a, num_iters=30).double()
    assert _rel_err(y @ y, a) < 1e-4


def test_isqrt_is_symmetric():
    a = _random_spd(4, 20, 0.1, 4.0, seed=12)
    for iters in (1, 3, 5, 20):
        y = isqrt(a, num_iters=iters)
        assert _rel_err(y, y.transpose(1, 2)) < 1e-5


@pytest.mark.parametrize('iters', [2, 3, 5])
def test_isqrt_matches_released_recursion(iters):
    # covariance-like input (the network's use), eigenvalues spread over several orders of magnitude
    x = torch.relu(torch.randn(3, 48, 10, 10, generator=_gen(13)))
    cov = covariance_pool(x).double()
    assert _rel_err(isqrt(cov, num_iters=iters), _released_isqrt(cov, iters)) < FP32_RTOL
    a = _random_spd(2, 17, 0.01, 5.0, seed=14, scale=37.0)
    assert _rel_err(isqrt(a, num_iters=iters), _released_isqrt(a, iters)) < FP32_RTOL


def test_isqrt_default_is_three_iterations():
    a = _random_spd(2, 8, 0.3, 2.0, seed=15)
    assert torch.equal(isqrt(a), isqrt(a, num_iters=3))


def test_isqrt_one_iteration_is_documented_y_factor():
    # documented deviation from the released code (which returns the Z factor at iterN=1)
    a = _random_spd(2, 6, 0.3, 2.0, seed=16)
    tr = a.diagonal(dim1=1, dim2=2).sum(-1).view(-1, 1, 1)
    an = a / tr
    expected = an @ (0.5 * (3 * torch.eye(6, dtype=torch.float64) - an)) * tr.sqrt()
    assert _rel_err(isqrt(a, num_iters=1), expected) < FP32_RTOL


@pytest.mark.parametrize('iters', [1, 3, 5])
def test_isqrt_all_zero_gives_zeros_and_finite_gradients(iters):
    x = torch.zeros(2, 5, 5, requires_grad=True)
    y = isqrt(x, num_iters=iters)
    assert torch.equal(y, torch.zeros(2, 5, 5))
    (y * torch.randn(2, 5, 5, generator=_gen(17))).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_isqrt_zero_sample_does_not_poison_the_batch():
    a = _random_spd(2, 6, 0.5, 2.0, seed=18).float()
    a[0] = 0
    a.requires_grad_(True)
    y = isqrt(a, num_iters=5)
    assert torch.equal(y[0], torch.zeros(6, 6))
    assert _rel_err(y[1], _released_isqrt(a[1:].detach(), 5)[0]) < FP32_RTOL
    y.sum().backward()
    assert torch.isfinite(a.grad).all()


def test_isqrt_trace_eps_only_matters_for_tiny_traces():
    assert TRACE_EPS > 0
    a = _random_spd(1, 4, 0.5, 2.0, seed=19) * 100 * TRACE_EPS  # trace well above the floor
    assert _rel_err(isqrt(a, 3), _released_isqrt(a, 3)) < FP32_RTOL


@pytest.mark.parametrize('iters', [0, -1])
def test_isqrt_rejects_bad_num_iters(iters):
    with pytest.raises(ValueError, match=rf'num_iters must be >= 1, got {iters}'):
        isqrt(torch.eye(3).expand(2, 3, 3), num_iters=iters)


@pytest.mark.parametrize('shape', [(2, 3, 4), (3, 3), (1, 2, 3, 3)])
def test_isqrt_rejects_non_square_batches(shape):
    with pytest.raises(ValueError, match=r'square matrices \(B, N, N\), got shape ' + re.escape(str(list(shape)))):
        isqrt(torch.ones(*shape))


# --------------------------------------------------------------------------------------------------
# triu_vectorize
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('d', [1, 2, 5, 33, 256])
def test_triu_order_matches_released_code(d):
    idx = triu_indices_flat(d)
    assert idx.numel() == d * (d + 1) // 2
    assert torch.equal(idx, released_triu_index(d))


def test_triu_vectorize_values_and_length():
    x = torch.randn(2, 256, 256, generator=_gen(20))
    v = triu_vectorize(x)
    assert v.shape == (2, 32896)
    assert torch.equal(v, x.flatten(1)[:, released_triu_index(256)])
    # first entries: (0,0), (1,0), (1,1), (2,0), ... (lower triangle row by row)
    assert torch.equal(v[:, :4], torch.stack([x[:, 0, 0], x[:, 1, 0], x[:, 1, 1], x[:, 2, 0]], 1))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16])
def test_triu_vectorize_keeps_dtype(dtype):
    assert triu_vectorize(torch.zeros(1, 3, 3, dtype=dtype)).dtype == dtype


def test_triu_vectorize_gradient_goes_to_exactly_the_selected_entries():
    d = 9
    x = torch.randn(3, d, d, generator=_gen(21), requires_grad=True)
    w = torch.randn(3, d * (d + 1) // 2, generator=_gen(22))
    (triu_vectorize(x) * w).sum().backward()
    idx = released_triu_index(d)
    grad = x.grad.flatten(1)
    assert torch.equal(grad[:, idx], w)
    mask = torch.ones(d * d, dtype=torch.bool)
    mask[idx] = False
    assert torch.equal(grad[:, mask], torch.zeros(3, int(mask.sum())))


# --------------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------------

def _spd64(b, n, seed):
    a = torch.randn(b, n, n, dtype=torch.float64, generator=_gen(seed))
    return a @ a.transpose(1, 2) + n * torch.eye(n, dtype=torch.float64)


def test_float64_gradcheck():
    """float64 input keeps float64 inside the ops, so torch.autograd.gradcheck applies."""
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, generator=_gen(23), requires_grad=True)
    assert covariance_pool(x).dtype == torch.float64
    assert torch.autograd.gradcheck(covariance_pool, (x,))
    assert torch.autograd.gradcheck(position_gram, (x,))
    spd = _spd64(2, 4, 24).requires_grad_()
    for iters in (1, 3, 5):
        assert torch.autograd.gradcheck(lambda a: isqrt(a, iters), (spd,))
    assert torch.autograd.gradcheck(triu_vectorize, (spd,))
    # the whole Net2 head composition, as used by ISqrtCovPool
    feats = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=_gen(25), requires_grad=True)
    chain = lambda f: triu_vectorize(isqrt(covariance_pool(f), 3))
    assert torch.autograd.gradcheck(chain, (feats,))


def _ref_cov_f64(x):
    b, c = x.shape[:2]
    xf = x.reshape(b, c, -1)
    xc = xf - xf.mean(dim=2, keepdim=True)
    return xc @ xc.transpose(1, 2) / xf.shape[-1]


def _ref_gram_f64(x):
    b, c = x.shape[:2]
    xf = x.reshape(b, c, -1)
    p = xf.shape[-1]
    s = xf.sum(dim=1)
    return xf.transpose(1, 2) @ xf / p - s.unsqueeze(2) * s.unsqueeze(1) / p ** 2


def _ref_isqrt3_f64(a):
    return _released_isqrt(a, 3)


def _ref_triu_f64(a):
    return a.flatten(1)[:, released_triu_index(a.shape[-1])]


def _spd_input(seed):
    return _random_spd(2, 5, 0.5, 2.0, seed=seed)


def _feat_input(seed):
    return torch.randn(2, 4, 3, 5, generator=_gen(seed), dtype=torch.float64)


GRAD_CASES = [
    ('covariance_pool', covariance_pool, _ref_cov_f64, _feat_input),
    ('position_gram', position_gram, _ref_gram_f64, _feat_input),
    ('isqrt', lambda a: isqrt(a, 3), _ref_isqrt3_f64, _spd_input),
    ('isqrt5', lambda a: isqrt(a, 5), lambda a: _released_isqrt(a, 5), _spd_input),
    ('triu_vectorize', triu_vectorize, _ref_triu_f64, _spd_input),
]


@pytest.mark.parametrize('name,op,ref,make', GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradient_matches_float64_reference(name, op, ref, make):
    """Analytic gradient of the op (autograd through float32) vs autograd of an independent float64
    implementation of the same formula."""
    x64 = make(30)
    x32 = x64.float().requires_grad_(True)
    x64 = x32.detach().double().requires_grad_(True)
    out32 = op(x32)
    w = torch.randn(out32.shape, generator=_gen(31), dtype=torch.float64)
    (out32 * w.float()).sum().backward()
    (ref(x64) * w).sum().backward()
    assert _rel_err(x32.grad, x64.grad) < 1e-4


@pytest.mark.parametrize('name,op,ref,make', GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradient_matches_float32_finite_differences(name, op, ref, make):
    """Directional central differences of the op itself, with a step large enough for float32."""
    x = make(40).float().requires_grad_(True)
    out = op(x)
    w = torch.randn(out.shape, generator=_gen(41))
    (out * w).sum().backward()
    h = 1e-2
    g = _gen(42)
    for _ in range(3):
        v = torch.randn(x.shape, generator=g)
        if x.dim() == 3:  # keep perturbed matrices symmetric (isqrt's domain)
            v = 0.5 * (v + v.transpose(1, 2))
        with torch.no_grad():
            plus = (op(x + h * v).double() * w.double()).sum()
            minus = (op(x - h * v).double() * w.double()).sum()
        fd = ((plus - minus) / (2 * h)).item()
        analytic = (x.grad.double() * v.double()).sum().item()
        assert fd == pytest.approx(analytic, rel=2e-3, abs=2e-3 * x.grad.abs().sum().item())


# --------------------------------------------------------------------------------------------------
# autocast
# --------------------------------------------------------------------------------------------------

AUTOCAST_CASES = [
    ('covariance_pool', covariance_pool, lambda: torch.rand(2, 32, 7, 6, generator=_gen(50)) * 3),
    ('position_gram', position_gram, lambda: torch.randn(2, 32, 8, 8, generator=_gen(51))),
    ('isqrt', lambda a: isqrt(a, 5), lambda: _random_spd(2, 32, 0.1, 2.0, seed=52).float()),
    ('triu_vectorize', triu_vectorize, lambda: torch.randn(2, 16, 16, generator=_gen(53))),
]


@pytest.mark.parametrize('name,op,make', AUTOCAST_CASES, ids=[c[0] for c in AUTOCAST_CASES])
def test_ops_stay_float32_under_bf16_autocast(name, op, make):
    x = make()
    expected = op(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = op(x)
    assert out.dtype == torch.float32
    # bmm runs in bf16 under CPU autocast: an op that did not disable autocast would be off by ~1e-2
    assert _rel_err(out, expected) < 1e-6


def test_full_second_order_pipeline_under_autocast():
    x = torch.rand(2, 24, 7, 7, generator=_gen(54))
    expected = triu_vectorize(isqrt(covariance_pool(x), 3))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = triu_vectorize(isqrt(covariance_pool(x), 3))
    assert out.dtype == torch.float32
    assert _rel_err(out, expected) < 1e-6


# --------------------------------------------------------------------------------------------------
# property-based
# --------------------------------------------------------------------------------------------------

_scales = st.sampled_from([1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3])


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    b=st.integers(1, 3), c=st.integers(1, 16), h=st.integers(1, 9), w=st.integers(1, 9),
    scale=_scales, nonneg=st.booleans(), seed=st.integers(0, 2 ** 16),
)
def test_property_covariance_and_isqrt(b, c, h, w, scale, nonneg, seed):
    x = torch.randn(b, c, h, w, generator=_gen(seed)) * scale
    if nonneg:
        x = torch.relu(x)
    cov = covariance_pool(x)
    assert cov.shape == (b, c, c) and cov.dtype == torch.float32
    assert torch.isfinite(cov).all()
    cmax = cov.abs().max().item()
    assert torch.allclose(cov, cov.transpose(1, 2), rtol=0, atol=1e-6 * cmax)
    eig = torch.linalg.eigvalsh(0.5 * (cov + cov.transpose(1, 2)).double())
    assert eig.min().item() >= -1e-5 * c * cmax
    assert _rel_err(cov, _ref_covariance(x)) < 1e-4

    root = isqrt(cov, num_iters=5)
    assert torch.isfinite(root).all()
    rmax = root.abs().max().item()
    assert torch.allclose(root, root.transpose(1, 2), rtol=0, atol=1e-5 * rmax)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(1, 16), b=st.integers(1, 3), scale=_scales, cond=st.floats(1.0, 10.0),
       seed=st.integers(0, 2 ** 16))
def test_property_isqrt_squares_back(n, b, scale, cond, seed):
    a = _random_spd(b, n, 1.0, cond, seed=seed, scale=scale)
    y = isqrt(a, num_iters=25)
    assert torch.isfinite(y).all()
    assert _rel_err(y, y.transpose(1, 2)) < 1e-5
    yd = y.double()
    resid = torch.linalg.matrix_norm(yd @ yd - a) / torch.linalg.matrix_norm(a)
    assert resid.max().item() < 1e-4
