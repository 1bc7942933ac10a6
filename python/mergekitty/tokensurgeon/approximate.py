"""Rows of new tokens as weighted sums of shared tokens' rows.

For each target ``x`` (a new token's row in one of the donor's matrices) a method picks a few
atoms (shared tokens' rows in that same matrix) and weights ``w`` with ``x ≈ Σ w_j d_j``. The
output's row for the token is then ``Σ w_j m_j``, ``m_j`` being the same tokens' rows in the
model's matrix (``Approximation.apply``): the weights are fitted where the new token has a row
and applied where it has none.

- ``omp``, orthogonal matching pursuit: ``k`` greedy steps; each adds the atom most correlated
  with the residual (``|<r, d>| / ||d||``) and refits the weights of every atom chosen so far by
  least squares. A target stops early once its residual is below ``OMP_TOLERANCE`` of its norm.
- ``knn``: the ``k`` nearest atoms, by euclidean distance or (``cosine``) ``1 - cos``, weighted
  by ``distance_proportional`` (softmin of the distances: ``softmax(-distance)``),
  ``barycentric`` (least squares with weights that sum to 1) or ``least_squares`` (plain least
  squares over the k neighbours).

numpy only: float32 products with the dictionary, float64 for the small solves, a batch of
targets at a time (``batch_size``, smaller when the batch's chosen atoms would exceed
``BATCH_BYTES``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError

log = logging.getLogger(__name__)

METHODS = ("omp", "knn")
WEIGHT_SCHEMES = ("distance_proportional", "barycentric", "least_squares")
OMP_TOLERANCE = 1e-5
# the most bytes a batch's working arrays may take (its gathered rows, Gram matrices and scores)
BATCH_BYTES = 1 << 28


@dataclass(frozen=True)
class Approximation:
    """Per target: ``atoms`` (``[n, k]`` dictionary rows, -1 where unused) and their
    ``weights`` (``[n, k]`` float64, 0 where unused)."""

    atoms: np.ndarray
    weights: np.ndarray

    def apply(self, rows: np.ndarray) -> np.ndarray:
        """``Σ_j weights[:, j] * rows[atoms[:, j]]`` as float32 ``[n, width]``: ``rows`` are the
        atoms' rows in another matrix (row i of ``rows`` belongs to dictionary row i)."""
        n, width = self.atoms.shape[0], rows.shape[1]
        out = np.empty((n, width), dtype=np.float32)
        step = _rows_per_batch(n, width * 8)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            acc = np.zeros((hi - lo, width), dtype=np.float64)
            for j in range(self.atoms.shape[1]):
                atoms = self.atoms[lo:hi, j]
                used = atoms >= 0
                if used.any():
                    acc[used] += self.weights[lo:hi, j][used, None] * rows[atoms[used]]
            out[lo:hi] = acc
        return out


def _rows_per_batch(batch_size: int, row_bytes: int) -> int:
    cap = max(1, BATCH_BYTES // max(row_bytes, 1))
    return min(batch_size, cap) if batch_size > 0 else cap


def _solve(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Batched ``gram @ w = rhs`` (symmetric positive semi-definite ``gram``), with a ridge of
    1e-10 of the mean diagonal so that a degenerate set of atoms still has a solution."""
    size = gram.shape[-1]
    diag = np.einsum("bii->b", gram) / size
    ridge = 1e-10 * diag + 1e-30
    system = gram + ridge[:, None, None] * np.eye(size)
    try:
        return np.linalg.solve(system, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return np.stack([np.linalg.lstsq(g, r, rcond=None)[0] for g, r in zip(system, rhs)])


# called after each batch with the number of targets done so far
Progress = Callable[[int], None]


def _prepared(
    dictionary: np.ndarray, targets: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]:
    """(float32 atoms, float32 targets, k capped at the atom count, empty choices, zero weights)."""
    atoms = np.ascontiguousarray(dictionary, dtype=np.float32)
    x = np.asarray(targets, dtype=np.float32)
    k = max(0, min(k, atoms.shape[0]))
    return atoms, x, k, np.full((x.shape[0], k), -1, dtype=np.int64), np.zeros((x.shape[0], k), dtype=np.float64)


def omp(
    dictionary: np.ndarray, targets: np.ndarray, k: int, batch_size: int = 512, on_batch: Progress | None = None
) -> Approximation:
    """Orthogonal matching pursuit of each row of ``targets`` over the rows of ``dictionary``."""
    if k > dictionary.shape[1]:
        # more atoms than dimensions fit the target exactly with meaningless weights, at k**4 cost
        log.warning(
            "-k %d is more than the embedding width %d: %d atoms are used", k, dictionary.shape[1], dictionary.shape[1]
        )
        k = dictionary.shape[1]
    atoms_f32, x, k, chosen, weights = _prepared(dictionary, targets, k)
    m, width = atoms_f32.shape
    n = x.shape[0]
    if n == 0 or k == 0:
        return Approximation(chosen, weights)
    norms = np.sqrt(np.einsum("mh,mh->m", atoms_f32, atoms_f32, dtype=np.float64))
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)  # a zero atom never scores
    # per target: its picked atoms (float32), Gram matrix (float64) and a step's scores over every atom
    step = _rows_per_batch(batch_size, k * width * 4 + k * k * 8 + m * 4 * 3)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        chosen[lo:hi], weights[lo:hi] = _omp_batch(atoms_f32, scale, x[lo:hi], k)
        if on_batch is not None:
            on_batch(hi)
    return Approximation(chosen, weights)


def _omp_batch(atoms: np.ndarray, scale: np.ndarray, x32: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    b, width = x32.shape
    x = x32.astype(np.float64)
    limit = OMP_TOLERANCE * np.linalg.norm(x, axis=1)
    chosen = np.full((b, k), -1, dtype=np.int64)
    coef = np.zeros((b, k), dtype=np.float64)
    picked = np.zeros((b, k, width), dtype=np.float32)
    gram = np.zeros((b, k, k), dtype=np.float64)
    rhs = np.zeros((b, k), dtype=np.float64)
    residual = x.copy()
    rows = np.arange(b)[:, None]
    for s in range(k):
        active = np.linalg.norm(residual, axis=1) > limit
        if not active.any():
            break
        scores = np.abs(residual.astype(np.float32) @ atoms.T) * scale
        if s:
            scores[rows, chosen[:, :s]] = -1.0  # an atom is chosen once
        best = np.argmax(scores, axis=1)
        # a finished target gets a zero atom with a unit diagonal: its weights stay as they are
        chosen[:, s] = np.where(active, best, -1)
        picked[:, s] = np.where(active[:, None], atoms[best], 0.0)
        new = picked[:, s].astype(np.float64)
        gram[:, s, : s + 1] = np.einsum("bh,bih->bi", new, picked[:, : s + 1])
        gram[:, : s + 1, s] = gram[:, s, : s + 1]
        gram[~active, s, s] = 1.0
        rhs[:, s] = np.einsum("bh,bh->b", new, x)
        coef[:, : s + 1] = _solve(gram[:, : s + 1, : s + 1], rhs[:, : s + 1])
        residual = x - np.einsum("bi,bih->bh", coef[:, : s + 1], picked[:, : s + 1])
    return chosen, coef


def knn(
    dictionary: np.ndarray,
    targets: np.ndarray,
    k: int,
    cosine: bool = False,
    scheme: str = "distance_proportional",
    batch_size: int = 512,
    on_batch: Progress | None = None,
) -> Approximation:
    """The ``k`` nearest rows of ``dictionary`` to each row of ``targets``, weighted by ``scheme``."""
    if scheme not in WEIGHT_SCHEMES:
        raise InvalidArgumentError(f"unknown weight scheme {scheme!r}; one of {', '.join(WEIGHT_SCHEMES)}")
    atoms, x, k, chosen, weights = _prepared(dictionary, targets, k)
    m, width = atoms.shape
    n = x.shape[0]
    if n == 0 or k == 0:
        return Approximation(chosen, weights)
    atom_sq = np.einsum("mh,mh->m", atoms, atoms, dtype=np.float64)
    # per target: its neighbours' rows, and its distances to every atom (float64, with two working copies)
    step = _rows_per_batch(batch_size, k * width * 8 + m * 8 * 3)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        xb = x[lo:hi].astype(np.float64)
        dots = (x[lo:hi] @ atoms.T).astype(np.float64)
        x_sq = np.einsum("bh,bh->b", xb, xb)
        if cosine:
            denom = np.sqrt(x_sq)[:, None] * np.sqrt(atom_sq)[None, :]
            dist = 1.0 - np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)
        else:
            dist = np.sqrt(np.maximum(x_sq[:, None] - 2.0 * dots + atom_sq[None, :], 0.0))
        near = np.argpartition(dist, k - 1, axis=1)[:, :k] if k < m else np.tile(np.arange(m), (hi - lo, 1))
        d = np.take_along_axis(dist, near, axis=1)
        order = np.argsort(d, axis=1, kind="stable")
        near, d = np.take_along_axis(near, order, axis=1), np.take_along_axis(d, order, axis=1)
        chosen[lo:hi] = near
        weights[lo:hi] = _knn_weights(atoms, near, d, xb, scheme)
        if on_batch is not None:
            on_batch(hi)
    return Approximation(chosen, weights)


def _knn_weights(atoms: np.ndarray, near: np.ndarray, dist: np.ndarray, x: np.ndarray, scheme: str) -> np.ndarray:
    if scheme == "distance_proportional":
        z = -dist - (-dist).max(axis=1, keepdims=True)
        e = np.exp(z)
        softmin: np.ndarray = e / e.sum(axis=1, keepdims=True)
        return softmin
    neighbours = atoms[near].astype(np.float64)  # [b, k, h]
    if scheme == "barycentric":
        # min ||x - Σ w_j d_j|| with Σ w_j = 1: solve (Z Zᵀ) w = 1 for Z = d_j - x, then scale to sum 1
        z = neighbours - x[:, None, :]
        w = _solve(np.einsum("bih,bjh->bij", z, z), np.ones(near.shape))
        total = w.sum(axis=1, keepdims=True)
        return np.where(total == 0, 1.0 / w.shape[1], w / np.where(total == 0, 1.0, total))
    gram = np.einsum("bih,bjh->bij", neighbours, neighbours)
    return _solve(gram, np.einsum("bih,bh->bi", neighbours, x))


def approximate(
    dictionary: np.ndarray,
    targets: np.ndarray,
    method: str,
    k: int,
    cosine: bool = False,
    scheme: str = "distance_proportional",
    batch_size: int = 512,
    on_batch: Progress | None = None,
) -> Approximation:
    """``omp`` or ``knn`` (module docstring) of ``targets`` over ``dictionary``; ``on_batch(done)``
    after each batch of targets."""
    if method == "omp":
        return omp(dictionary, targets, k, batch_size, on_batch)
    if method == "knn":
        return knn(dictionary, targets, k, cosine, scheme, batch_size, on_batch)
    raise InvalidArgumentError(f"unknown approximation method {method!r}; one of {', '.join(METHODS)}")


def relative_errors(approx: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``||approx - truth|| / ||truth||`` per row (NaN where the true row is zero)."""
    diff = np.linalg.norm(approx.astype(np.float64) - truth, axis=1)
    norm = np.linalg.norm(truth.astype(np.float64), axis=1)
    errors: np.ndarray = np.divide(diff, norm, out=np.full_like(diff, np.nan), where=norm > 0)
    return errors
