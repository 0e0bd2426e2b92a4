"""Best-of-N: N independent samples, every step scored by the reward model, and
the answer whose candidates' aggregated scores sum highest (weighted best-of-N,
as in the compute-optimal scaling paper and search-and-learn).

A selection over a repeated-sampling run: the run it stores is the sampling run
(extendable, N not in its id), with the reward model's step scores beside it, so
best-of-N at every k <= N is computed from the same samples without drawing
again (`metrics.selection_at_k`, the expectation over k-subsets).
"""

from __future__ import annotations

from .base import STRATEGIES
from .sampling import RepeatedSampling


@STRATEGIES.register("best_of_n")
class BestOfN(RepeatedSampling):
    name = "best_of_n"
    needs_prm = True
    selection = "weighted"
