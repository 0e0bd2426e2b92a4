"""Search strategies over an engine and a reward model."""

from .search import STRATEGIES, Path, SearchConfig, SearchResult, best_of_n, tree_search

__all__ = ["STRATEGIES", "Path", "SearchConfig", "SearchResult", "best_of_n", "tree_search"]
