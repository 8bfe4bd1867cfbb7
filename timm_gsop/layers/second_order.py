"""Second-order pooling ops: covariance, iSQRT matrix square root, triangular vectorisation.

Every op here computes in float32 (float64 for float64 input) whatever the input dtype and whether
or not the caller runs under ``torch.autocast``, and returns that dtype: covariances of ReLU features and Newton-Schulz
iterations lose too much in fp16/bf16 (the trace alone can overflow fp16 at d=256).

All ops are batched (no Python loop over samples), never build an MxM centring matrix, and are
usable on their own::

    cov = covariance_pool(feats)              # (B, C, H, W) -> (B, C, C)
    root = isqrt(cov, num_iters=5)            # approx. cov ** 0.5
    vec = triu_vectorize(root)                # (B, C * (C + 1) / 2)

They are registered as leaf functions for ``torch.fx`` (plain ``symbolic_trace`` and timm's
feature extraction), so a traced model keeps the float32 region intact.
"""
import warnings
from typing import Dict, Tuple

import torch
from torch import Tensor

from timm.layers import register_notrace_function

from .autograd_functions import Covariance, centred_covariance

__all__ = [
    'covariance_pool', 'position_gram', 'isqrt', 'triu_vectorize', 'triu_indices_flat',
    'autocast_active', 'upcast', 'TRACE_EPS',
    'skip_checks',
]

# Guard for the trace normalisation in iSQRT. A ReLU feature map that is all zero (a blank image,
# a dead channel group, zero-init BN) has trace 0; the released code divides 0 by 0. Typical traces of
# BN-ReLU features are O(d), so this floor changes nothing for real inputs.
TRACE_EPS = 1e-5

# torch.is_autocast_enabled(device_type) raises for device types autocast does not know (e.g. meta).
_AUTOCAST_DEVICE_TYPES = ('cpu', 'cuda', 'xpu', 'mps', 'hpu', 'mtia', 'xla', 'ipu')


def autocast_active(x: Tensor) -> bool:
    """True when autocast is on for ``x``'s device (False under fx tracing and for meta tensors)."""
    if isinstance(x, torch.fx.Proxy):
        return False
    device_type = x.device.type
    return device_type in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type)


def skip_checks(x: Tensor) -> bool:
    """True while fx or torch.jit.trace records a graph: shape checks would be baked in (or fail)."""
    return isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing()


def upcast(x: Tensor) -> Tensor:
    """``x`` in at least float32 (float64 stays float64): the dtype every op here computes in."""
    # at least float32; float64 stays float64 (exact checks, gradcheck, double-precision models)
    return x if x.dtype == torch.float64 else x.float()


def _check_feature_map(x: Tensor, name: str) -> None:
    if skip_checks(x):
        return
    if x.dim() != 4:
        raise ValueError(f'{name} expects a 4-D (B, C, H, W) feature map, got shape {tuple(x.shape)}')


def _covariance_fp32(x: Tensor) -> Tensor:
    x = upcast(x.flatten(2))
    if not torch.jit.is_scripting():
        if not (skip_checks(x) or torch.compiler.is_compiling()):
            return Covariance.apply(x)
    return centred_covariance(x)


def covariance_pool(x: Tensor) -> Tensor:
    """Channel covariance over spatial positions: ``(B, C, H, W) -> (B, C, C)``, float32 (float64 in,
    float64 out).

    ``S = (X - mean) (X - mean)^T / M`` with ``M = H * W`` (the biased estimator, as the paper and the
    released code use). Symmetric positive semi-definite by construction.
    """
    if not torch.jit.is_scripting():
        _check_feature_map(x, 'covariance_pool')
        if autocast_active(x):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return _covariance_fp32(x)
    return _covariance_fp32(x)


def _position_gram_fp32(x: Tensor) -> Tensor:
    x = upcast(x.flatten(2))
    num_positions = x.shape[-1]
    sums = x.sum(dim=1)  # per-position sum over channels, (B, P)
    gram = torch.bmm(x.transpose(1, 2), x)
    return gram.div_(num_positions) - sums.unsqueeze(2) * sums.unsqueeze(1) / (num_positions * num_positions)


def position_gram(x: Tensor) -> Tensor:
    """Position-wise second-order matrix of the released position GSoP: ``(B, C, H, W) -> (B, P, P)``.

    ``Gram / P - outer(s, s) / P^2`` with ``P = H * W`` and ``s`` the per-position channel sums. This is
    what the released code computes (its ``cov_feature``); it is a true covariance only when C == P.
    We keep the formula so that checkpoints trained with it give the same outputs. Float32 output.
    """
    if not torch.jit.is_scripting():
        _check_feature_map(x, 'position_gram')
        if autocast_active(x):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return _position_gram_fp32(x)
    return _position_gram_fp32(x)


def _isqrt_fp32(x: Tensor, num_iters: int, eps: float) -> Tensor:
    x = upcast(x)
    dim = x.shape[-1]
    eye3 = torch.eye(dim, dtype=x.dtype, device=x.device).mul_(3.0)
    # pre-normalise by the trace so that Newton-Schulz converges (eigenvalues of A in (0, 1])
    trace = x.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(eps).view(-1, 1, 1)
    a = x / trace
    zy = 0.5 * (eye3 - a)
    if num_iters < 2:
        y = torch.bmm(a, zy)
    else:
        y = torch.bmm(a, zy)
        z = zy
        for _ in range(num_iters - 2):
            zy = 0.5 * (eye3 - torch.bmm(z, y))
            y, z = torch.bmm(y, zy), torch.bmm(zy, z)
        y = 0.5 * torch.bmm(y, eye3 - torch.bmm(z, y))
    # post-compensation: undo the trace normalisation (sqrt because we took a square root)
    return y * trace.sqrt()


def isqrt(x: Tensor, num_iters: int = 3, eps: float = TRACE_EPS) -> Tensor:
    """Approximate matrix square root of SPD matrices by coupled Newton-Schulz iterations (iSQRT-COV).

    ``(B, N, N) -> (B, N, N)``, float32 (or float64). The input is divided by its trace, iterated
    ``num_iters`` times
    (``Y_{k+1} = Y_k T_k, Z_{k+1} = T_k Z_k, T_k = (3I - Z_k Y_k) / 2``, the last step computing Y only),
    and multiplied by ``sqrt(trace)``. The trace is floored at ``eps`` so an all-zero matrix gives zeros
    with finite gradients. ``num_iters=1`` gives ``A (3I - A) / 2`` (the released code returns the Z
    factor there, a bug; the paper's networks use 3 and 5).
    """
    if not torch.jit.is_scripting():
        if not skip_checks(x) and (x.dim() != 3 or x.shape[-1] != x.shape[-2]):
            raise ValueError(f'isqrt expects a batch of square matrices (B, N, N), got shape {tuple(x.shape)}')
        if num_iters < 1:
            raise ValueError(f'isqrt num_iters must be >= 1, got {num_iters}')
        if autocast_active(x):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return _isqrt_fp32(x, num_iters, eps)
    return _isqrt_fp32(x, num_iters, eps)


def triu_indices_flat(dim: int, device: torch.device = torch.device('cpu')) -> Tensor:
    """Flat indices (into an N*N row-major matrix) of the lower triangle incl. diagonal, row by row.

    This is the released code's order (``ones(N, N).triu().t()`` nonzeros); for a symmetric matrix it
    holds the same values as the upper triangle read column by column. Built from Python integers, so a
    tracer (``torch.jit.trace``, the TorchScript ONNX exporter) records it as a constant, not as
    ``aten::tril_indices`` (which ONNX has no op for).
    """
    with warnings.catch_warnings():
        # a tracer records it as a constant, which is what we want here
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        dim = int(dim)  # under torch.jit.trace a size is a traced tensor: one int, not N^2 traced ops
        index = [row * dim + col for row in range(dim) for col in range(row + 1)]
        return torch.tensor(index, dtype=torch.long, device=device)


def _triu_indices_flat_script(dim: int, device: torch.device) -> Tensor:
    rows_cols = torch.tril_indices(dim, dim, device=device)
    return rows_cols[0] * dim + rows_cols[1]


def triu_vectorize(x: Tensor) -> Tensor:
    """Vectorise the triangle of symmetric matrices: ``(B, N, N) -> (B, N * (N + 1) / 2)``.

    One gather with an index computed once per (N, device), no per-sample loop. Keeps the input dtype.
    """
    if not torch.jit.is_scripting():
        if not skip_checks(x) and (x.dim() != 3 or x.shape[-1] != x.shape[-2]):
            raise ValueError(f'triu_vectorize expects (B, N, N), got shape {tuple(x.shape)}')
        if not torch.compiler.is_compiling():  # compiled graphs bake the index in themselves
            return x.flatten(1).index_select(1, _cached_triu_index(x.shape[-1], x.device))
    return x.flatten(1).index_select(1, _triu_indices_flat_script(x.shape[-1], x.device))


_TRIU_INDEX_CACHE: Dict[Tuple[int, torch.device], Tensor] = {}


def _cached_triu_index(dim: int, device: torch.device) -> Tensor:
    key = (dim, device)
    index = _TRIU_INDEX_CACHE.get(key)
    if index is None:
        # a normal tensor even when first asked for under inference_mode: backward may save it later
        with torch.inference_mode(False):
            index = triu_indices_flat(dim, device)
        if not torch.jit.is_tracing():  # a traced constant stays out of the cache
            _TRIU_INDEX_CACHE[key] = index
    return index


# leaf functions for fx: plain torch.fx.symbolic_trace (fx.wrap patches this module's globals, so
# callers must call them as `second_order.<fn>`) and timm's feature extraction (autowrap set)
for _fn in (covariance_pool, position_gram, isqrt, triu_vectorize):
    torch.fx.wrap(_fn.__name__)
    register_notrace_function(_fn)
