""" Second-order pooling ops: covariance, iSQRT matrix square root, triangle vectorisation

Each op computes in float32 (float64 stays float64) whatever the input dtype, also under ``torch.autocast``:
covariances of ReLU features and Newton-Schulz iterations lose too much in fp16 / bf16 (the trace alone can
overflow fp16 at d = 256). All are batched plain autograd ops, and leaves for timm's fx feature extraction and
``torch.fx.symbolic_trace`` (callers ``torch.fx.wrap`` the names they import): a traced model keeps the float32 region.

    cov = covariance_pool(feats)              # (B, C, H, W) -> (B, C, C)
    root = isqrt(cov, num_iters=5)            # approx. cov ** 0.5
    vec = triu_vectorize(root)                # (B, C * (C + 1) / 2)

GSoP-Net (Gao et al., CVPR 2019); iSQRT-COV (Li et al., CVPR 2018, https://github.com/jiangtaoxie/fast-MPN-COV).
"""
import contextlib
from typing import ContextManager, Optional

import torch
from torch import Tensor

from timm.layers import register_notrace_function

__all__ = ['TRACE_EPS', 'autocast_off', 'upcast', 'covariance_pool', 'position_gram', 'isqrt', 'triu_indices_flat',
           'triu_vectorize']

# Floor of the trace normalisation in iSQRT. An all-zero ReLU feature map (a blank image, a dead channel group) has
# trace 0, which the released code divides by. Traces of BN-ReLU features are O(d): no change for real inputs.
TRACE_EPS = 1e-5

# device types torch.autocast knows (it raises for others, e.g. meta)
_AUTOCAST_DEVICE_TYPES = ('cpu', 'cuda', 'xpu', 'mps', 'hpu', 'mtia')


def autocast_off(x: Tensor) -> ContextManager:
    """A context in which autocast is disabled on ``x``'s device: the float32 region of the second-order ops. Not
    usable under TorchScript: callers take it under ``if not torch.jit.is_scripting()``."""
    # a plain torch.fx.symbolic_trace proxy has no device to read: the region is recorded as its ops
    if not isinstance(x, torch.fx.Proxy) and x.device.type in _AUTOCAST_DEVICE_TYPES:
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


def upcast(x: Tensor) -> Tensor:
    """``x`` in at least float32 (float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def _covariance(x: Tensor) -> Tensor:
    x = upcast(x).flatten(2)
    centred = x - x.mean(dim=2, keepdim=True)
    return torch.bmm(centred, centred.transpose(1, 2)) / x.shape[-1]


@register_notrace_function
def covariance_pool(x: Tensor) -> Tensor:
    """Channel covariance over spatial positions: ``(B, C, H, W) -> (B, C, C)``, float32 (float64 stays).
    ``S = (X - mean)(X - mean)^T / M`` with ``M = H * W`` (the biased estimator of the paper and the released code,
    whose ``X I_hat X^T`` this equals). Symmetric positive semi-definite."""
    if not torch.jit.is_scripting():
        with autocast_off(x):
            return _covariance(x)
    return _covariance(x)


def _position_gram(x: Tensor) -> Tensor:
    x = upcast(x).flatten(2)
    positions = x.shape[-1]
    sums = x.sum(dim=1)  # per-position sum over channels, (B, P)
    return torch.bmm(x.transpose(1, 2), x) / positions - sums.unsqueeze(2) * sums.unsqueeze(1) / (positions * positions)


@register_notrace_function
def position_gram(x: Tensor) -> Tensor:
    """The released position GSoP's second-order matrix: ``(B, C, H, W) -> (B, P, P)``, ``P = H * W``.
    ``Gram / P - outer(s, s) / P^2``, ``s`` the per-position channel sums: what the released code computes (its
    ``cov_feature``), a true covariance only when C == P. Kept so that its checkpoints give the same outputs."""
    if not torch.jit.is_scripting():
        with autocast_off(x):
            return _position_gram(x)
    return _position_gram(x)


def _identity(size: int, like: Tensor) -> Tensor:
    """The ``size x size`` identity in ``like``'s dtype and device, as an int64 ``arange`` compared with itself. Not
    ``torch.eye``: ``torch.export`` decomposes it into an ``arange`` of the narrowest integer dtype that holds ``size``
    (uint16 from 256 on, the iSQRT-COV head's size), which converters such as OpenVINO's do not know."""
    index = torch.arange(size, device=like.device)
    return (index.unsqueeze(1) == index.unsqueeze(0)).to(like.dtype)


def _isqrt(x: Tensor, num_iters: int, eps: float) -> Tensor:
    x = upcast(x)
    eye = _identity(x.shape[-1], x)
    eye3 = 3.0 * eye
    # divide by the trace so that Newton-Schulz converges (eigenvalues in (0, 1]); the trace as a masked sum,
    # which every exporter and converter knows (aten::diagonal is missing in some)
    trace = (x * eye).sum(dim=(-2, -1), keepdim=True).clamp_min(eps)
    a = x / trace
    zy = 0.5 * (eye3 - a)
    y = torch.bmm(a, zy)
    if num_iters >= 2:
        z = zy
        for _ in range(num_iters - 2):
            zy = 0.5 * (eye3 - torch.bmm(z, y))
            y, z = torch.bmm(y, zy), torch.bmm(zy, z)
        y = 0.5 * torch.bmm(y, eye3 - torch.bmm(z, y))
    # undo the normalisation: sqrt because this is a square root
    return y * trace.sqrt()


@register_notrace_function
def isqrt(x: Tensor, num_iters: int = 3, eps: float = TRACE_EPS) -> Tensor:
    """Approximate square root of SPD matrices by coupled Newton-Schulz iterations (iSQRT-COV).
    ``(B, N, N) -> (B, N, N)``, float32 (float64 stays). The input is divided by its trace (floored at ``eps``, so an
    all-zero matrix gives zeros with finite gradients), iterated ``num_iters`` times (``Y <- Y T``, ``Z <- T Z``,
    ``T = (3I - Z Y) / 2``; the last step computes Y only) and multiplied by ``sqrt(trace)``. ``num_iters=1`` gives
    ``A (3I - A) / 2`` (the released code returns its Z factor there, a bug; the networks use 3 and 5)."""
    if num_iters < 1:
        raise ValueError(f'isqrt num_iters must be >= 1, got {num_iters}')
    # else broadcasting gives a wrong answer or a cryptic error (a trace records shapes as constants: no check,
    # which would only warn that it compares them)
    if not torch.jit.is_tracing() and (x.dim() != 3 or x.shape[-1] != x.shape[-2]):
        raise ValueError(f'isqrt expects square matrices (B, N, N), got shape {list(x.shape)}')
    if not torch.jit.is_scripting():
        with autocast_off(x):
            return _isqrt(x, num_iters, eps)
    return _isqrt(x, num_iters, eps)


def triu_indices_flat(dim: int, device: Optional[torch.device] = None) -> Tensor:
    """Flat int64 indices into a row-major ``dim x dim`` matrix of its lower triangle with the diagonal, row by
    row: the released ``Triuvec`` order (for a symmetric matrix, the upper triangle read column by column)."""
    rows_cols = torch.tril_indices(dim, dim, device=device)
    return rows_cols[0] * dim + rows_cols[1]


@register_notrace_function
def triu_vectorize(x: Tensor, index: Optional[Tensor] = None) -> Tensor:
    """The triangle of symmetric matrices as a vector: ``(B, N, N) -> (B, N (N + 1) / 2)``, one gather. ``index``:
    :func:`triu_indices_flat` of N (a module keeps it as a buffer); built here when not given."""
    if index is None:
        index = triu_indices_flat(x.shape[-1], x.device)
    return x.flatten(1).index_select(1, index)
