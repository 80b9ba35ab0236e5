"""How close a backend's outputs are to the torch fp32 reference: the largest error relative to
the reference's range, and whether a class map made from the embeddings comes out the same.

Embeddings have no classes of their own, so the class map is the one a user would make first:
k-means on the reference embeddings (seeded, so both sides use the same centroids), each pixel
labelled by its nearest centroid. Agreement is the share of pixels whose label the backend
keeps; a small numeric error that moves pixels across class boundaries shows up here even when
the maximum error looks harmless.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: max relative error allowed per precision (fp32 < 1e-4, fp16/bf16 < 2e-2; int8 < 5e-2)
LIMITS = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 2e-2, "int8": 5e-2}
#: the smallest share of pixels whose k-means class a backend must keep, per precision. bf16 keeps
#: 8 bits of mantissa to fp16's 11: Presto in bf16 on an H200 kept 97.6% (rel. error 1.0e-2)
MIN_AGREEMENT = {"fp32": 0.999, "fp16": 0.98, "bf16": 0.97, "int8": 0.97}


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref|."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        raise ValueError(f"shapes differ: {got.shape} vs {ref.shape}")
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def _rows(x: np.ndarray) -> np.ndarray:
    """[N, C, H, W] (or [N, C]) to one row per pixel, [N*H*W, C]."""
    x = np.asarray(x, np.float32)
    if x.ndim == 2:
        return x
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


def _nearest(rows: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    d = (rows * rows).sum(1)[:, None] - 2.0 * rows @ centroids.T + (centroids * centroids).sum(1)[None, :]
    return d.argmin(1)


def kmeans(rows: np.ndarray, k: int = 8, *, seed: int = 0, iters: int = 25) -> np.ndarray:
    """Centroids [k, C] by Lloyd's algorithm from k seeded distinct rows."""
    rng = np.random.default_rng(seed)
    uniq = np.unique(rows, axis=0)
    if len(uniq) < k:
        raise ValueError(f"k-means with k={k} needs at least {k} distinct pixels, got {len(uniq)}")
    c = uniq[rng.choice(len(uniq), k, replace=False)].astype(np.float64)
    r = rows.astype(np.float64)
    for _ in range(iters):
        lab = _nearest(r, c)
        new = np.stack([r[lab == j].mean(0) if (lab == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return c.astype(np.float32)


def class_agreement(got: np.ndarray, ref: np.ndarray, *, k: int = 8, seed: int = 0) -> float:
    """Share of pixels labelled alike in the k-means class maps of `got` and `ref` (centroids
    fitted on `ref`)."""
    a, b = _rows(got), _rows(ref)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {np.shape(got)} vs {np.shape(ref)}")
    c = kmeans(b, k, seed=seed)
    return float((_nearest(a, c) == _nearest(b, c)).mean())


@dataclass(frozen=True)
class Agreement:
    rel_error: float
    class_agreement: float

    def ok(self, precision: str) -> bool:
        return self.rel_error < LIMITS[precision] and self.class_agreement >= MIN_AGREEMENT[precision]

    def __str__(self) -> str:
        return f"rel. error {self.rel_error:.2e}, classes agree on {self.class_agreement:.2%} of pixels"


def agreement(got: np.ndarray, ref: np.ndarray, *, k: int = 8) -> Agreement:
    return Agreement(rel_error(got, ref), class_agreement(got, ref, k=k))
