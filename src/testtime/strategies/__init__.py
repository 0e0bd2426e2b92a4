"""Strategies, registered by name: one file each, one signature (see `base`).

This module is the registry's front: importing it registers every built-in
strategy, and the defaults that name strategies live here and nowhere else.
"""

from . import (adaptive, beam, best_of_n, deepconf, dvts, lookahead, majority, particles, policy,  # noqa: F401
               revision, sampling, thought)  # (importing them registers them)
from .base import (STRATEGIES, Candidate, ProblemResult, SearchContext, Strategy, StrategyParams, load_strategy,
                   strategy_params, trait)

COMPARED = ("best_of_n", "beam_search", "dvts")
"""What `testtime compare` compares unless told otherwise."""
CANDIDATES = ("best_of_n", "majority", "beam_search", "dvts")
"""What `testtime optimal` chooses among unless told otherwise."""
BASELINE = "best_of_n"
"""The strategy a compute-optimal policy is measured against (the paper's baseline)."""

__all__ = ["STRATEGIES", "Candidate", "ProblemResult", "SearchContext", "Strategy", "StrategyParams", "load_strategy",
           "strategy_params", "trait", "COMPARED", "CANDIDATES", "BASELINE"]
