"""Step-wise search with a process reward model: beam search, DVTS and lookahead,
and best-of-N as the baseline they are compared with.

A solution grows one step at a time: a step is what the model writes up to the
delimiter (a blank line by default). Every iteration advances all problems
together, so the engine sees one large batch:

1. each parent path asks for its children in one request (the children share
   the parent's prefix; `retain=True` lets the embedded engine keep each new
   step's KV cache, so continuing a path never prefills it again);
2. the reward model scores every new step;
3. each problem keeps its best paths for the next iteration.

Beam search (N beams, width M): N candidates per iteration; the N/M best
unfinished paths survive, and each gets M children. DVTS (N/M subtrees of width
M): every subtree expands its own path into M children and keeps its single
best child, so the N/M subtrees stay diverse. A path that ends (end of text,
or max tokens) is finished and kept. Lookahead (k > 0): a child is ranked by
the score of the last step of a k-step greedy rollout from it rather than by
its own step's score; the rollout is discarded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from ..engines.base import Engine, Request
from ..flops import Usage
from ..prompts import PromptTemplate
from ..rewards.base import RewardModel, Scoring, split_steps
from ..select import aggregate
from ..spec import SamplingParams, sample_seed
from ..tasks.base import Problem


@dataclass
class Path:
    """A partial or finished solution: its steps and the reward model's score of each."""

    steps: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    finished: bool = False
    finish_reason: str = ""
    tokens: int = 0
    """Tokens generated along this path (its own steps only)."""
    rank: float | None = None
    """What the search ranks the path by (lookahead: the rollout's score)."""

    def text(self, delimiter: str) -> str:
        return delimiter.join(self.steps)

    def child(self, step: str, tokens: int, finished: bool, reason: str) -> "Path":
        steps = self.steps + [step] if step.strip() else list(self.steps)
        return Path(steps, list(self.scores), finished, reason, self.tokens + tokens)


@dataclass(frozen=True)
class SearchConfig:
    n: int = 8
    """The budget N: completions generated per problem per iteration."""
    width: int = 4
    """M: children per expanded path."""
    max_iterations: int = 12
    delimiter: str = "\n\n"
    aggregation: str = "last"
    lookahead: int = 0
    """k: steps of greedy rollout used to rank each child (0: rank by the child itself)."""
    sequential: int = 1
    """Revision: attempts per chain (the first plus revisions); N / sequential chains
    run in parallel. 1 is pure parallel sampling, N one long chain of revisions."""

    def __post_init__(self) -> None:
        if self.n < 1 or self.width < 1 or self.n % self.width:
            raise ValueError(f"search needs n and width >= 1 with width dividing n, got n={self.n}, width={self.width}")
        if self.max_iterations < 1 or self.lookahead < 0:
            raise ValueError("max_iterations must be >= 1 and lookahead >= 0")
        if not self.delimiter:
            raise ValueError("the step delimiter must not be empty")
        if self.sequential < 1 or self.n % self.sequential:
            raise ValueError(f"sequential must divide n, got n={self.n}, sequential={self.sequential}")


@dataclass
class SearchStats:
    generated_tokens: int = 0
    rollout_tokens: int = 0
    steps_scored: int = 0
    iterations: int = 0
    usage: Usage = field(default_factory=Usage)
    """Everything the policy engine computed, lookahead rollouts included (for FLOPs)."""


@dataclass
class SearchResult:
    paths: dict[str, list[Path]]
    """Per problem: the finished paths (and, after the last iteration, the unfinished)."""
    stats: SearchStats


def _request(key: Any, problem: Problem, path: Path, template: PromptTemplate, params: SamplingParams,
             seeds: tuple[int, ...], delimiter: str, final: bool) -> Request:
    continuation = template.continuation(problem.question) + "".join(s + delimiter for s in path.steps)
    stop = params.stop if final else tuple(dict.fromkeys((delimiter,) + params.stop))
    return Request(key=key, seeds=seeds, params=replace(params, stop=stop), retain=not final,
                   messages=tuple(template.messages(problem.question)), continuation=continuation)


def _expand(engine: Engine, problems: dict[str, Problem], parents: list[tuple[str, Path, int]],
            template: PromptTemplate, params: SamplingParams, cfg: SearchConfig, seed: int, it: int,
            final: bool, stats: SearchStats) -> list[tuple[str, Path, int]]:
    """One generation round: parents (problem id, path, number of children) to children."""
    requests = [_request((pid, i), problems[pid], path, template, params,
                         tuple(sample_seed(seed, f"{pid}/{it}/{i}", j) for j in range(count)),
                         cfg.delimiter, final)
                for i, (pid, path, count) in enumerate(parents)]
    children = []
    for c in engine.generate(requests):
        pid, i = c.key
        step_done = c.stop_hit == cfg.delimiter
        children.append((pid, parents[i][1].child(c.text, c.completion_tokens, not step_done, c.finish_reason), i))
        stats.generated_tokens += c.completion_tokens
        stats.usage += Usage.of(c.prompt_tokens, c.cached_tokens, c.completion_tokens)
    children.sort(key=lambda t: t[2])  # a stable order, whatever order the engine finished in
    return children


def _score(prm: RewardModel | None, problems: dict[str, Problem], paths: Sequence[tuple[str, Path]],
           stats: SearchStats) -> None:
    """Score the steps each path has that it has no score for yet (nothing without a reward model)."""
    if prm is None:
        return
    todo = [(pid, p) for pid, p in paths if len(p.scores) < len(p.steps)]
    items = [Scoring(problems[pid].question, tuple(p.steps), len(p.scores)) for pid, p in todo]
    for (pid, p), new in zip(todo, prm.score(items) if items else []):
        p.scores.extend(new)
        stats.steps_scored += len(new)


def _rank_by_lookahead(engine: Engine, prm: RewardModel, problems: dict[str, Problem],
                       children: list[tuple[str, Path, int]], template: PromptTemplate, params: SamplingParams,
                       cfg: SearchConfig, stats: SearchStats) -> None:
    """Rank each unfinished child by the score of the last step of a k-step greedy
    rollout from it; finished children keep their own score."""
    greedy = replace(params, temperature=0.0)
    rollouts = {id(p): p for _, p, _ in children if not p.finished}
    live = [(pid, Path(list(p.steps), list(p.scores)), id(p)) for pid, p, _ in children if not p.finished]
    for _ in range(cfg.lookahead):
        active = [(pid, path, owner) for pid, path, owner in live if not path.finished]
        if not active:
            break
        before = stats.generated_tokens
        grown = _expand(engine, problems, [(pid, path, 1) for pid, path, _ in active], template, greedy,
                        cfg, 0, -1, False, stats)
        stats.rollout_tokens += stats.generated_tokens - before
        stats.generated_tokens = before
        live = [(pid, path, active[i][2]) for pid, path, i in grown] + \
               [(pid, path, owner) for pid, path, owner in live if path.finished]
    _score(prm, problems, [(pid, path) for pid, path, _ in live], stats)
    for pid, path, owner in live:
        rollouts[owner].rank = aggregate(path.scores[-1:], "last")


def tree_search(problems: Sequence[Problem], engine: Engine, prm: RewardModel, template: PromptTemplate,
                params: SamplingParams, cfg: SearchConfig, mode: str = "beam", seed: int = 0) -> SearchResult:
    """Beam search (mode='beam') or DVTS (mode='dvts') over all problems at once."""
    if mode not in ("beam", "dvts"):
        raise ValueError(f"mode must be 'beam' or 'dvts', got {mode!r}")
    by_id = {p.id: p for p in problems}
    stats = SearchStats()
    groups = cfg.n // cfg.width
    done: dict[str, list[Path]] = {p.id: [] for p in problems}
    # parents: (problem id, path, children wanted, group)
    if mode == "beam":
        frontier = [(p.id, Path(), cfg.n, 0) for p in problems]
    else:
        frontier = [(p.id, Path(), cfg.width, g) for p in problems for g in range(groups)]
    for it in range(cfg.max_iterations):
        if not frontier:
            break
        stats.iterations += 1
        final = it == cfg.max_iterations - 1
        children = _expand(engine, by_id, [(pid, path, count) for pid, path, count, _ in frontier],
                           template, params, cfg, seed, it, final, stats)
        _score(prm, by_id, [(pid, path) for pid, path, _ in children], stats)
        if cfg.lookahead and not final:
            _rank_by_lookahead(engine, prm, by_id, children, template, params, cfg, stats)
        for _, path, _ in children:
            if path.rank is None:
                path.rank = aggregate(path.scores, cfg.aggregation)
        next_frontier = []
        if mode == "beam":
            for pid in by_id:
                mine = [path for q, path, _ in children if q == pid]
                done[pid] += [path for path in mine if path.finished]
                alive = sorted((path for path in mine if not path.finished), key=lambda x: -x.rank)
                if final:
                    done[pid] += alive
                    continue
                next_frontier += [(pid, path, cfg.width, 0) for path in alive[:groups]]
        else:
            for i, (pid, _, _, g) in enumerate(frontier):
                mine = [path for _, path, parent in children if parent == i]
                if not mine:
                    continue
                best = max(mine, key=lambda x: x.rank)
                if best.finished or final:
                    done[pid].append(best)
                else:
                    next_frontier.append((pid, best, cfg.width, g))
        frontier = next_frontier
    return SearchResult(done, stats)


def best_of_n(problems: Sequence[Problem], engine: Engine, prm: RewardModel, template: PromptTemplate,
              params: SamplingParams, cfg: SearchConfig, seed: int = 0) -> SearchResult:
    """N independent complete samples per problem, every step scored afterwards."""
    by_id = {p.id: p for p in problems}
    stats = SearchStats(iterations=1)
    requests = [Request(key=p.id, seeds=tuple(sample_seed(seed, p.id, i) for i in range(cfg.n)), params=params,
                        messages=tuple(template.messages(p.question)), continuation=template.continuation(p.question))
                for p in problems]
    done: dict[str, list[Path]] = {p.id: [] for p in problems}
    for c in engine.generate(requests):
        done[c.key].append((c.index, Path(split_steps(c.text, cfg.delimiter), [], True, c.finish_reason,
                                          c.completion_tokens)))
        stats.generated_tokens += c.completion_tokens
        stats.usage += Usage.of(c.prompt_tokens, c.cached_tokens, c.completion_tokens)
    done = {pid: [p for _, p in sorted(v, key=lambda t: t[0])] for pid, v in done.items()}
    _score(prm, by_id, [(pid, p) for pid, v in done.items() for p in v], stats)
    for v in done.values():
        for p in v:
            p.rank = aggregate(p.scores, cfg.aggregation)
    return SearchResult(done, stats)


REVISE = ("Check your solution above step by step. If a step is wrong, correct it. "
          "Then write the whole solution again and end with the final answer.")


def revision(problems: Sequence[Problem], engine: Engine, prm: RewardModel, template: PromptTemplate,
             params: SamplingParams, cfg: SearchConfig, seed: int = 0, instruction: str = REVISE) -> SearchResult:
    """Sequential revisions: N / cfg.sequential chains; in each round every chain's
    latest attempt is shown back to the model, which writes a revised one. All
    chains of all problems advance together, one engine call per round. Every
    attempt is scored and returned (a chain's later attempts first)."""
    by_id = {p.id: p for p in problems}
    stats = SearchStats()
    chains = cfg.n // cfg.sequential
    history: dict[tuple[str, int], list[Path]] = {(p.id, c): [] for p in problems for c in range(chains)}
    for rnd in range(cfg.sequential):
        stats.iterations += 1
        requests = []
        for (pid, c), attempts in history.items():
            msgs = list(template.messages(by_id[pid].question))
            if attempts:
                msgs += [{"role": "assistant", "content": attempts[-1].text(cfg.delimiter)},
                         {"role": "user", "content": instruction}]
            requests.append(Request(key=(pid, c), seeds=(sample_seed(seed, f"{pid}/rev{rnd}", c),), params=params,
                                    messages=tuple(msgs), continuation=template.continuation(by_id[pid].question)))
        for comp in engine.generate(requests):
            history[comp.key].append(Path(split_steps(comp.text, cfg.delimiter), [], True, comp.finish_reason,
                                          comp.completion_tokens))
            stats.generated_tokens += comp.completion_tokens
            stats.usage += Usage.of(comp.prompt_tokens, comp.cached_tokens, comp.completion_tokens)
    done: dict[str, list[Path]] = {p.id: [] for p in problems}
    for (pid, _), attempts in sorted(history.items()):
        done[pid] += attempts[::-1]
    _score(prm, by_id, [(pid, p) for pid, v in done.items() for p in v], stats)
    for v in done.values():
        for p in v:
            p.rank = aggregate(p.scores, cfg.aggregation)
    return SearchResult(done, stats)


STRATEGIES = {
    "best_of_n": best_of_n,
    "beam_search": lambda *a, **k: tree_search(*a, mode="beam", **k),
    "dvts": lambda *a, **k: tree_search(*a, mode="dvts", **k),
    "revision": revision,
}
"""Name -> function(problems, engine, prm, template, params, cfg, seed=0) -> SearchResult.
Lookahead is beam search with `SearchConfig(lookahead=k)`."""
