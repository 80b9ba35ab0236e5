"""Seam statistics for class maps: are class changes more frequent across tile or window edges
than elsewhere? Used by the tests and the benchmark to prove that stitching leaves no seams."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tilefm.grid import TILE_SIZE


def control_periods(period: int) -> list[int]:
    """Primes within 20% of `period`: never a multiple of a window stride, so their phase profile
    is the noise floor to compare a window period's against."""
    lo, hi = int(period * 0.8), int(period * 1.25) + 1
    return [q for q in range(max(lo, 3), hi) if all(q % d for d in range(2, int(q**0.5) + 1))]


@dataclass
class SeamReport:
    edge_rate: float
    interior_rate: float
    #: class changes across tile edges / across interior rows and columns (1 = no seam)
    edge_ratio: float
    #: for each window period: the peak phase's change rate / the mean over phases, divided by the
    #: median of the same score at control periods (1 = no stripe at that period)
    stripe: dict[int, float]

    def as_dict(self) -> dict:
        return {
            "edge_ratio": round(self.edge_ratio, 3),
            "edge_rate": self.edge_rate,
            "interior_rate": self.interior_rate,
            "stripe": {k: round(v, 3) for k, v in self.stripe.items()},
        }


def _boundary_counts(a: np.ndarray, nodata: int) -> tuple[np.ndarray, np.ndarray]:
    """Changes and valid pairs across each column boundary c-1|c (index c-1), summed over rows."""
    v = a != nodata
    pair = v[:, 1:] & v[:, :-1]
    change = (a[:, 1:] != a[:, :-1]) & pair
    return change.sum(0).astype(np.float64), pair.sum(0).astype(np.float64)


def _phase_score(change: np.ndarray, pairs: np.ndarray, period: int) -> float:
    pos = np.arange(1, len(change) + 1)
    k = pos % period
    ch = np.bincount(k, change, minlength=period)
    pr = np.bincount(k, pairs, minlength=period)
    ok = pr > 0
    rate = ch[ok] / pr[ok]
    return float(rate.max() / rate.mean()) if rate.mean() > 0 else 1.0


def seam_report(
    classes: np.ndarray,
    nodata: int = 255,
    periods: tuple[int, ...] = (32, 64, 128, 256),
    tile: int = TILE_SIZE,
) -> SeamReport:
    """`classes` is a class map whose pixel (0, 0) is a tile corner (as tilefm's outputs are)."""
    counts = [_boundary_counts(classes, nodata), _boundary_counts(classes.T, nodata)]
    change = np.concatenate([c for c, _ in counts])
    pairs = np.concatenate([p for _, p in counts])
    pos = np.concatenate([np.arange(1, classes.shape[1]), np.arange(1, classes.shape[0])])
    edge = pos % tile == 0
    edge_rate = change[edge].sum() / max(pairs[edge].sum(), 1)
    interior_rate = change[~edge].sum() / max(pairs[~edge].sum(), 1)
    stripe = {}
    for p in periods:
        scores = [np.mean([_phase_score(c, pr, q) for c, pr in counts]) for q in control_periods(p)]
        score = np.mean([_phase_score(c, pr, p) for c, pr in counts])
        stripe[p] = float(score / np.median(scores))
    return SeamReport(
        float(edge_rate),
        float(interior_rate),
        float(edge_rate / interior_rate) if interior_rate else float("inf"),
        stripe,
    )
