"""Strategies, registered by name: one file each, one signature (see `base`)."""

from . import beam, dvts, lookahead, revision, sampling  # noqa: F401  (registers them)
from .base import (STRATEGIES, Candidate, ProblemResult, SearchContext, Strategy, StrategyParams, load_strategy,
                   strategy_params)
from .search import Path, SearchConfig, SearchResult, best_of_n, tree_search  # the previous API, until callers move

__all__ = ["STRATEGIES", "Candidate", "ProblemResult", "SearchContext", "Strategy", "StrategyParams", "load_strategy",
           "strategy_params", "Path", "SearchConfig", "SearchResult", "best_of_n", "tree_search"]
