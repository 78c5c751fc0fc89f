"""Implicit-feedback ALS rows solved by a few conjugate-gradient steps (no Spark here).

The objective is Hu, Koren and Volinsky's weighted least squares, the one MLlib's implicit
ALS minimises: a pair with summed weight w has preference 1 and confidence 1 + alpha * w,
every other pair preference 0 and confidence 1. Row u's factor solves

    (Y'Y + Y'(C_u - I)Y + lambda_u I) x_u = Y' C_u p_u

where lambda_u is reg (constant, as the `implicit` library does) or reg x the row's number
of pairs (MLlib's scaling). Instead of MLlib's exact Cholesky solve per row, each sweep takes
`steps` CG steps warm-started from the row's current factor (Takacs, Pilaszy and Tikk, 2011;
`implicit`'s default): the products above never form the k x k matrix of a row, so a step
costs O(nnz k + rows k^2), not O(nnz k^2). `solve_rows` works on one block of rows at a time
(a CSR slice); `stages.als_cg` runs it per Spark partition.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

REG_SCALINGS = ("constant", "count")


@dataclass(frozen=True)
class CgParams:
    """The solve's settings: confidence 1 + alpha * weight; lambda_u = reg (x the row's pair
    count with reg_scaling "count"); CG steps per row per sweep."""

    alpha: float
    reg: float
    reg_scaling: str = "constant"
    steps: int = 3


@dataclass(frozen=True)
class RowBlock:
    """Some rows of the pair matrix in CSR form: `rows` are the rows' global indices,
    row j's pairs are cols[indptr[j]:indptr[j+1]] with summed weights `weights`."""

    rows: np.ndarray  # (n,) int64
    indptr: np.ndarray  # (n + 1,) int64
    cols: np.ndarray  # (nnz,) int64, global indices of the other side
    weights: np.ndarray  # (nnz,) float32

    @staticmethod
    def from_pairs(rows: np.ndarray, cols: np.ndarray, weights: np.ndarray) -> RowBlock:
        """The block of the given (row, col, weight) pairs; every row with a pair appears
        once, in ascending order."""
        order = np.lexsort((cols, rows))
        rows, cols, weights = rows[order], cols[order], weights[order]
        unique, counts = np.unique(rows, return_counts=True)
        indptr = np.zeros(len(unique) + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return RowBlock(
            rows=unique.astype(np.int64),
            indptr=indptr,
            cols=cols.astype(np.int64),
            weights=weights.astype(np.float32),
        )


def initial_factors(n: int, rank: int, seed: int) -> np.ndarray:
    """Seeded small random factors (n, rank), the `implicit` library's scale (uniform * 0.01)."""
    return (np.random.default_rng(seed).random((n, rank), dtype=np.float32) * 0.01).astype(
        np.float32
    )


def solve_rows(
    block: RowBlock,
    current: np.ndarray,
    other: np.ndarray,
    params: CgParams,
    *,
    max_pairs: int = 1_000_000,
) -> np.ndarray:
    """New factors (n, rank) for the block's rows: `params.steps` CG steps from their
    `current` rows (global matrix (n_rows_total, rank)) against the `other` side's factors
    (n_other, rank). Rows go through in slices of about `max_pairs` pairs (bounded memory)."""
    import torch

    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
    other_t = torch.from_numpy(np.ascontiguousarray(other, dtype=np.float32))
    gram = other_t.T @ other_t  # (rank, rank)
    out = np.empty((len(block.rows), other.shape[1]), dtype=np.float32)
    for start, stop in _slices(block.indptr, max_pairs):
        lo, hi = block.indptr[start], block.indptr[stop]
        x0 = torch.from_numpy(np.ascontiguousarray(current[block.rows[start:stop]]))
        out[start:stop] = _cg(
            block.indptr[start : stop + 1] - lo,
            block.cols[lo:hi],
            block.weights[lo:hi],
            x0,
            other_t,
            gram,
            params,
        ).numpy()
    return out


def _slices(indptr: np.ndarray, max_pairs: int) -> list[tuple[int, int]]:
    """Consecutive row ranges [start, stop) of at most about max_pairs pairs (a row with more
    pairs than that is a slice of its own)."""
    slices, start, n = [], 0, len(indptr) - 1
    while start < n:
        stop = int(np.searchsorted(indptr, indptr[start] + max_pairs, side="right")) - 1
        stop = min(max(stop, start + 1), n)
        slices.append((start, stop))
        start = stop
    return slices


def _cg(indptr, cols, weights, x, other, gram, params: CgParams):  # type: ignore[no-untyped-def]
    """Batched CG over the rows of one CSR slice; x (rows, rank) is the warm start."""
    import torch

    n, n_other = x.shape[0], other.shape[0]
    crow = torch.from_numpy(np.ascontiguousarray(indptr, dtype=np.int64))
    col = torch.from_numpy(np.ascontiguousarray(cols, dtype=np.int64))
    extra = torch.from_numpy(params.alpha * np.asarray(weights, dtype=np.float32))  # c - 1
    counts = torch.from_numpy(np.diff(indptr).astype(np.float32))
    reg = params.reg * (counts if params.reg_scaling == "count" else torch.ones(n))

    def csr(values):  # type: ignore[no-untyped-def]
        return torch.sparse_csr_tensor(crow, col, values, (n, n_other))

    pattern = csr(torch.zeros_like(extra))
    other_t = other.T.contiguous()

    def apply_a(p):  # type: ignore[no-untyped-def]
        # (Y'Y + Y'(C - I)Y + lambda I) p, row by row; Y p only at the row's own pairs
        dots = torch.sparse.sampled_addmm(pattern, p, other_t, beta=0.0).values()  # (nnz,)
        return p @ gram + reg[:, None] * p + torch.sparse.mm(csr(dots * extra), other)

    b = torch.sparse.mm(csr(1.0 + extra), other)  # (rows, rank): Y' C_u p_u
    r = b - apply_a(x)
    p = r.clone()
    rs = (r * r).sum(1)
    for _ in range(params.steps):
        ap = apply_a(p)
        denom = (p * ap).sum(1)
        step = torch.where(denom > 0, rs / denom.clamp_min(1e-30), torch.zeros_like(rs))
        x = x + step[:, None] * p
        r = r - step[:, None] * ap
        rs_new = (r * r).sum(1)
        p = r + torch.where(rs > 0, rs_new / rs.clamp_min(1e-30), torch.zeros_like(rs))[:, None] * p
        rs = rs_new
    return x


def exact_rows(block: RowBlock, other: np.ndarray, params: CgParams) -> np.ndarray:
    """The exact solution of the same normal equations (a dense solve per row): the
    reference `solve_rows` converges to, and MLlib's per-row answer with reg_scaling "count"."""
    rank = other.shape[1]
    gram = other.T.astype(np.float64) @ other
    out = np.empty((len(block.rows), rank), dtype=np.float64)
    for j in range(len(block.rows)):
        lo, hi = block.indptr[j], block.indptr[j + 1]
        y = other[block.cols[lo:hi]].astype(np.float64)
        extra = params.alpha * block.weights[lo:hi].astype(np.float64)
        lam = params.reg * ((hi - lo) if params.reg_scaling == "count" else 1)
        a = gram + (y.T * extra) @ y + lam * np.eye(rank)
        out[j] = np.linalg.solve(a, ((1.0 + extra)[:, None] * y).sum(0))
    return out
