"""Problem difficulty in five bins, with or without ground truth.

- oracle: the problem's pass@1, estimated from many samples graded against the
  reference answer (Snell et al. 2024; search-and-learn);
- predicted: the mean reward-model score of a few samples, which needs no
  reference answer, so a policy can use it on new problems.

Either way a higher value means an easier problem. Bin 1 is the easiest fifth,
bin 5 the hardest. The edges are the quintiles of the values they are fitted
on; values equal to an edge fall in the harder bin, so tied problems (many
problems with pass@1 = 0) always share a bin, which may leave a bin empty.
New problems (a test split, a user's batch) are binned with the fitted edges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from .errors import InputError

KINDS = ("oracle", "predicted")


@dataclass
class DifficultyBins:
    kind: str
    edges: list[float]
    """Descending thresholds: a value above edges[0] is bin 1; at or below edges[-1], the last bin."""
    fitted_on: int = 0
    counts: dict[int, int] = field(default_factory=dict)
    """Problems per bin in the data the edges were fitted on."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"difficulty kind must be one of {KINDS}, got {self.kind!r}")
        if any(not math.isfinite(e) for e in self.edges) or list(self.edges) != sorted(self.edges, reverse=True):
            raise InputError(f"difficulty edges must be finite and descending, got {self.edges}")

    @property
    def bins(self) -> int:
        return len(self.edges) + 1

    def bin_of(self, value: float) -> int:
        if not math.isfinite(value):
            raise ValueError(f"a difficulty value must be finite, got {value}")
        return 1 + sum(value <= e for e in self.edges)

    def assign(self, values: Mapping[str, float]) -> dict[str, int]:
        return {pid: self.bin_of(float(v)) for pid, v in values.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "edges": list(self.edges), "fitted_on": self.fitted_on,
                "counts": {str(k): v for k, v in self.counts.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DifficultyBins":
        try:
            return cls(d["kind"], [float(e) for e in d["edges"]], int(d.get("fitted_on", 0)),
                       {int(k): int(v) for k, v in (d.get("counts") or {}).items()})
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"bad difficulty section {dict(d)!r}: {e}") from None


def fit_difficulty(values: Mapping[str, float], bins: int = 5, kind: str = "oracle") -> DifficultyBins:
    """Edges at the quantiles 1 - i/bins (i = 1..bins-1) of the values."""
    if bins < 2:
        raise InputError(f"need at least 2 bins, got {bins}")
    if not values:
        raise InputError("cannot fit difficulty bins on no problems")
    x = np.asarray([float(v) for v in values.values()])
    if not np.all(np.isfinite(x)):
        bad = [pid for pid, v in values.items() if not math.isfinite(float(v))]
        raise InputError(f"difficulty values must be finite; problems {bad[:5]} are not")
    edges = [float(np.quantile(x, 1 - i / bins)) for i in range(1, bins)]
    fitted = DifficultyBins(kind, edges, len(x))
    assigned = fitted.assign(values)
    fitted.counts = {b: sum(1 for v in assigned.values() if v == b) for b in range(1, bins + 1)}
    return fitted
