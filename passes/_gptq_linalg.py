"""GPTQ's inverse Cholesky factor (for :mod:`.gptq`): ``U`` upper triangular with ``UᵀU = H⁻¹``.

Up to :data:`DIRECT_MAX_K` columns ``U`` is computed as before session 9: ``chol(inv(H))ᵀ`` (LU, a solve for K
right-hand sides, then a Cholesky: ≈ 3K³ flops; small layers' codes are unchanged). Above it, with ``J`` the
order-reversing permutation: ``J·H·J = L·Lᵀ`` gives ``H⁻¹ = (J·L⁻ᵀ·J)·(J·L⁻¹·J)``, a lower triangular factor
times its transpose, so ``U = J·L⁻¹·J`` — a Cholesky factorization (K³/3) and a triangular inverse by recursive
halving whose work is matrix products (K³/3): 2.8× (K = 1536) to 2.7× (K = 2880) faster, equal to the direct
factor to 1e-14 relative (the sweep's codes on the zoo models: benchmarks/RESULTS.md, "GPTQ speed (session 9)").
"""

from __future__ import annotations

import numpy as np

#: up to this many columns the direct ``chol(inv(H))ᵀ``; above, the reversed Cholesky factor's inverse
DIRECT_MAX_K = 128
#: the triangular inverse's recursion stops at this size (``numpy.linalg.inv`` of the block)
_LEAF = 64


def inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of H⁻¹ (GPTQ's U), damping more when H is numerically singular."""
    k = h.shape[0]
    extra = 0.0
    for _ in range(8):
        try:
            hd = h + extra * np.eye(k) if extra else h  # h + 0·I is h, value for value
            if k <= DIRECT_MAX_K:
                return np.linalg.cholesky(np.linalg.inv(hd)).T
            lower = np.linalg.cholesky(hd[::-1, ::-1])
            return np.ascontiguousarray(_lower_inverse(lower)[::-1, ::-1])
        except np.linalg.LinAlgError:
            extra = max(extra * 10.0, 1e-6 * float(np.mean(np.diag(h))) or 1e-6)
    raise RuntimeError("gptq: Hessian is not positive definite even after extra damping")


def inverse_cholesky_upper_stack(h: np.ndarray) -> np.ndarray:
    """:func:`inverse_cholesky_upper` of each ``h[g]`` ([groups, K, K]): element for element the same values
    (one batched LAPACK call per step up to :data:`DIRECT_MAX_K`, as each group alone would get)."""
    k = h.shape[1]
    if k <= DIRECT_MAX_K:
        try:
            return np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1)
        except np.linalg.LinAlgError:  # a group needs extra damping: each alone below, damped where it must be
            pass
    return np.stack([inverse_cholesky_upper(h[g]) for g in range(h.shape[0])])


def _lower_inverse(lower: np.ndarray) -> np.ndarray:
    """Inverse of a lower triangular matrix with a positive diagonal: [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0],
    [−C⁻¹·B·A⁻¹, C⁻¹]], halves recursively."""
    k = lower.shape[0]
    if k <= _LEAF:
        return np.tril(np.linalg.inv(lower))
    m = k // 2
    a_inv = _lower_inverse(lower[:m, :m])
    c_inv = _lower_inverse(lower[m:, m:])
    out = np.zeros_like(lower)
    out[:m, :m] = a_inv
    out[m:, m:] = c_inv
    out[m:, :m] = -(c_inv @ (lower[m:, :m] @ a_inv))
    return out
