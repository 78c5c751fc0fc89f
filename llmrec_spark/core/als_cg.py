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
from typing import Any

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


# Column tiles of about one core's L2 cache: a product over a tile's pairs gathers rows of the
# other side's factors from a slice small enough to stay in cache. Measured on 2 cores (AMD
# EPYC, 2 MiB L2 per core), 4.5M pairs at rank 64: the item-side product against 100k user
# factors (25 MB) took 118 ms untiled and 31 ms in tiles of 10k users.
TILE_BYTES = 2 * 2**20


def tile_size(rank: int) -> int:
    """Other-side rows per column tile at this rank (TILE_BYTES of float32 factors)."""
    return max(256, TILE_BYTES // (4 * rank))


@dataclass(frozen=True)
class RowBlock:
    """Some rows of the pair matrix in CSR form, cut into column tiles of `tile_size` columns
    of the other side: `rows` are the rows' global indices; row j's pairs in tile t are
    cols[indptr[t, j]:indptr[t, j + 1]] with summed weights `weights`. A tile's pairs are
    contiguous and row-major, so a range of rows is one contiguous run per tile."""

    rows: np.ndarray  # (n,) int64
    indptr: np.ndarray  # (n_tiles, n + 1) int64, offsets into cols
    cols: np.ndarray  # (nnz,) int64, global indices of the other side
    weights: np.ndarray  # (nnz,) float32
    tile_size: int

    @staticmethod
    def from_pairs(
        rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, *, tile_size: int = 2**62
    ) -> RowBlock:
        """The block of the given (row, col, weight) pairs; every row with a pair appears
        once, in ascending order. The default `tile_size` makes one tile."""
        rows, cols = rows.astype(np.int64), cols.astype(np.int64)
        first = int(rows.min()) if len(rows) else 0
        present = np.bincount(rows - first) > 0  # rows are a range's (a partition's) indices
        unique = np.flatnonzero(present) + first
        local = (np.cumsum(present) - 1)[rows - first]
        tiles = cols // tile_size
        n_tiles = int(tiles.max()) + 1 if len(tiles) else 1
        order = _tile_major_order(tiles, local, cols - tiles * tile_size, n_tiles, len(unique))
        local, cols, tiles = local[order], cols[order], tiles[order]
        counts = np.bincount(tiles * len(unique) + local, minlength=n_tiles * len(unique))
        indptr = np.zeros((n_tiles, len(unique) + 1), dtype=np.int64)
        np.cumsum(counts.reshape(n_tiles, len(unique)), axis=1, out=indptr[:, 1:])
        indptr += np.concatenate([[0], np.cumsum(indptr[:-1, -1])])[:, None]
        return RowBlock(
            rows=unique,
            indptr=indptr,
            cols=cols,
            weights=np.asarray(weights, dtype=np.float32)[order],
            tile_size=int(tile_size),
        )

    def pair_counts(self) -> np.ndarray:
        """(n,) every row's number of pairs, over all tiles."""
        return np.diff(self.indptr, axis=1).sum(axis=0)

    def row_pairs(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Row j's (cols, weights), tile by tile (so in ascending column order)."""
        spans = [
            slice(lo, hi) for lo, hi in zip(self.indptr[:, j], self.indptr[:, j + 1], strict=True)
        ]
        return (
            np.concatenate([self.cols[span] for span in spans]),
            np.concatenate([self.weights[span] for span in spans]),
        )


def _tile_major_order(
    tiles: np.ndarray, rows: np.ndarray, cols: np.ndarray, n_tiles: int, n_rows: int
) -> np.ndarray:
    """The permutation that sorts pairs by (tile, row, col): one stable argsort of a combined
    key where it fits in int64 (about twice as fast as a three-key lexsort)."""
    span = int(cols.max()) + 1 if len(cols) else 1
    if n_tiles * n_rows * span >= 2**63:
        return np.lexsort((cols, rows, tiles))
    return np.argsort((tiles * n_rows + rows) * span + cols, kind="stable")


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

    other_t = torch.from_numpy(np.ascontiguousarray(other, dtype=np.float32))
    gram = other_t.T @ other_t  # (rank, rank)
    out = np.empty((len(block.rows), other.shape[1]), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly")
        for start, stop in _slices(block.pair_counts(), max_pairs):
            tiles = [_Tile.of(block, t, start, stop, other_t) for t in range(block.indptr.shape[0])]
            x0 = torch.from_numpy(np.ascontiguousarray(current[block.rows[start:stop]]))
            out[start:stop] = _cg(tiles, x0, gram, params).numpy()
    return out


def _slices(counts: np.ndarray, max_pairs: int) -> list[tuple[int, int]]:
    """Consecutive row ranges [start, stop) of at most about max_pairs pairs (a row with more
    pairs than that is a slice of its own)."""
    ends = np.concatenate([[0], np.cumsum(counts)])
    slices, start, n = [], 0, len(counts)
    while start < n:
        stop = int(np.searchsorted(ends, ends[start] + max_pairs, side="right")) - 1
        stop = min(max(stop, start + 1), n)
        slices.append((start, stop))
        start = stop
    return slices


@dataclass(frozen=True)
class _Tile:
    """One column tile of a slice of rows, as torch tensors: the CSR pattern (rows x tile
    columns), the pairs' alpha * weight, and the tile's rows of the other side's factors."""

    crow: Any
    col: Any
    extra: Any
    other: Any

    @staticmethod
    def of(block: RowBlock, t: int, start: int, stop: int, other: Any) -> _Tile:
        import torch

        lo, hi = block.indptr[t, start], block.indptr[t, stop]
        first = t * block.tile_size
        return _Tile(
            crow=torch.from_numpy(block.indptr[t, start : stop + 1] - lo),
            col=torch.from_numpy(block.cols[lo:hi] - first),
            extra=torch.from_numpy(block.weights[lo:hi]),
            other=other[first : first + block.tile_size],
        )

    def csr(self, values: Any) -> Any:
        import torch

        n = self.crow.shape[0] - 1
        return torch.sparse_csr_tensor(
            self.crow, self.col, values, (n, self.other.shape[0]), check_invariants=False
        )


def _cg(tiles: list[_Tile], x, gram, params: CgParams):  # type: ignore[no-untyped-def]
    """Batched CG over the rows of one slice; x (rows, rank) is the warm start."""
    import torch

    n = x.shape[0]
    extras = [params.alpha * tile.extra for tile in tiles]  # c - 1 per pair
    patterns = [
        tile.csr(torch.zeros_like(extra)) for tile, extra in zip(tiles, extras, strict=True)
    ]
    counts = sum(tile.crow.diff() for tile in tiles).to(torch.float32)
    reg = params.reg * (counts if params.reg_scaling == "count" else torch.ones(n))

    def apply_a(p):  # type: ignore[no-untyped-def]
        # (Y'Y + Y'(C - I)Y + lambda I) p, row by row; Y p only at the row's own pairs
        out = p @ gram + reg[:, None] * p
        for tile, pattern, extra in zip(tiles, patterns, extras, strict=True):
            dots = torch.sparse.sampled_addmm(pattern, p, tile.other.T, beta=0.0).values()
            out += torch.sparse.mm(tile.csr(dots * extra), tile.other)
        return out

    b = sum(  # (rows, rank): Y' C_u p_u
        torch.sparse.mm(tile.csr(1.0 + extra), tile.other)
        for tile, extra in zip(tiles, extras, strict=True)
    )
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
        cols, weights = block.row_pairs(j)
        y = other[cols].astype(np.float64)
        extra = params.alpha * weights.astype(np.float64)
        lam = params.reg * (len(cols) if params.reg_scaling == "count" else 1)
        a = gram + (y.T * extra) @ y + lam * np.eye(rank)
        out[j] = np.linalg.solve(a, ((1.0 + extra)[:, None] * y).sum(0))
    return out
