"""The compute-optimal policy as a strategy (Snell et al. 2024): per problem, a cheap
probe estimates its difficulty, and the strategy and N that a fitted policy chose for
that difficulty bin at this budget run on it.

The policy file (`testtime optimal`) holds the bins' edges, the choice per bin and
budget, and the sampler, shared parameters and probe size it was fitted with; all of
them are used as fitted. The probe is `probe` independent samples: their mean
reward-model score for predicted difficulty, or their pass rate against the reference
for oracle difficulty (which needs the reference, so only offline). Its cost is
charged to each problem beside the chosen strategy's. Each problem's bin, difficulty
value and choice are stored with it (`Store.decisions`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..flops import Usage
from ..select import aggregate
from ..spec import SpecError
from ..tasks.base import Problem
from .base import STRATEGIES, ProblemResult, SearchContext, StrategyParams, load_strategy, strategy_params


@dataclass(frozen=True)
class PolicyParams(StrategyParams):
    """`n` is the budget B: each problem gets its bin's choice at some N <= B."""

    path: str = ""
    """The policy file `testtime optimal` wrote."""
    verifier: str = "math_answer"
    """Oracle difficulty only: the verifier that grades the probe samples against the reference."""

    def check(self) -> None:
        if not self.path:
            raise SpecError("path must name a policy file (testtime optimal --out FILE writes one)")
        if not Path(self.path).is_file():
            raise SpecError(f"path: no policy file at {self.path}")

    def to_dict(self) -> dict[str, Any]:
        """With the file's content hash, so a policy fitted again is a new run."""
        from ..tasks.base import file_digest

        return {**super().to_dict(), "policy_sha": file_digest(self.path)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PolicyParams":
        return super().from_dict({k: v for k, v in d.items() if k != "policy_sha"})


def run_policy(problems: Sequence[Problem], ctx: SearchContext, policy: Any, budget: int,
               verifier: str = "math_answer") -> Iterator[ProblemResult]:
    """Probe, bin and run each bin's choice; every result carries its decision."""
    from ..compare import PROBE_DELIMITER, arm_from_config
    from ..optimal import policy_candidates
    from ..registry import DEFAULT_STRATEGY

    if policy.difficulty is None:
        raise SpecError("the policy has no difficulty bins")
    cands = policy_candidates(policy)
    predicted = policy.difficulty.kind != "oracle"
    if predicted and ctx.prm is None:
        raise SpecError("this policy's difficulty is predicted by a reward model: give one (--prm judge or served)")
    fitted = replace(ctx, sampling=cands.sampling)  # the sampler the policy was fitted and evaluated with
    probe_params = strategy_params(DEFAULT_STRATEGY, {"n": cands.probe, "delimiter": PROBE_DELIMITER})
    probe = {r.problem_id: r for r in load_strategy(DEFAULT_STRATEGY).run(
        problems, replace(fitted, prm=ctx.prm if predicted else None), probe_params)}
    by_id = {p.id: p for p in problems}
    if predicted:
        values = {pid: sum(max(aggregate(list(c.scores), "last"), 0.0) for c in r.candidates) / len(r.candidates)
                  for pid, r in probe.items()}
    else:
        from ..verifiers import load_verifier

        check = load_verifier(verifier)
        values = {pid: sum(check.verify(by_id[pid], c.text).passed for c in r.candidates) / len(r.candidates)
                  for pid, r in probe.items()}
    bins = policy.difficulty.assign(values)
    groups: dict[tuple[str, int], list[Problem]] = {}
    for p in problems:
        choice = policy.choose(budget, bins[p.id])
        groups.setdefault((choice.config, choice.n), []).append(p)
    for (config, n), group in sorted(groups.items()):
        arm = arm_from_config(config, cands.params)
        params = arm.at(n)
        if params is None:
            raise SpecError(f"the policy's choice {config} does not run at N={n}")
        for res in load_strategy(arm.strategy).run(group, fitted, params):
            usage = dict(res.usage)
            for role, u in probe[res.problem_id].usage.items():  # the probe is part of what the choice cost
                usage[role] = usage.get(role, Usage()) + u
            yield replace(res, usage=usage, decision={"bin": bins[res.problem_id], "difficulty": values[res.problem_id],
                                                      "kind": policy.difficulty.kind, "choice": config, "n": n,
                                                      "strategy": arm.strategy, "params": arm.values})


@STRATEGIES.register("policy")
class PolicyStrategy:
    name = "policy"
    Params = PolicyParams
    needs_prm = False
    """A policy with predicted difficulty needs one, and says so when it runs."""

    def run(self, problems: Sequence[Problem], ctx: SearchContext, params: PolicyParams) -> Iterator[ProblemResult]:
        from ..policy import Policy

        return run_policy(problems, ctx, Policy.load(params.path), params.n, params.verifier)
