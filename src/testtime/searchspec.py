"""One search spec from the command line to the engine: how tokens are drawn, which
strategy with which parameters, and which reward model. Defaults live in the
dataclasses they belong to (`SamplingParams`, each strategy's `Params`), nowhere
else; the CLI, the API, `compare`, `optimal`, policy files and `serve` all build
this object, and a run records it in its spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .engines.base import Engine, load_engine
from .rewards.base import RewardModel, load_reward_model
from .registry import DEFAULT_STRATEGY
from .spec import SamplingParams, SpecError
from .strategies.base import STRATEGIES, StrategyParams, strategy_params


@dataclass(frozen=True)
class RewardModelSpec:
    """Which reward model scores steps, and its arguments."""

    name: str | None = None
    """A registered reward model (judge, served), or None for none."""
    args: dict[str, Any] = field(default_factory=dict)
    """Its arguments, e.g. base_url=... for served. For judge, `engine` and `engine_args`
    choose the engine it asks [default: a second instance of the policy's engine]."""

    def build(self, policy_engine: str | Engine, policy_args: dict[str, Any] | None = None) -> tuple[RewardModel | None, list]:
        """The reward model, and the engines built for it (to close)."""
        if self.name is None:
            return None, []
        args = dict(self.args)
        if self.name != "judge":
            rm = load_reward_model(self.name, **args)
            return rm, [rm] if hasattr(rm, "close") else []  # a trained verifier holds a model
        engine_name = args.pop("engine", None)
        engine_args = dict(args.pop("engine_args", None) or {})
        if engine_name is None and not isinstance(policy_engine, str):
            return load_reward_model("judge", engine=policy_engine, **args), []
        if engine_name is None:
            engine_name, engine_args = policy_engine, {**(policy_args or {}), **engine_args}
            if engine_name == "llamacpp":  # its own instance: judging never evicts the policy's cached paths
                engine_args = {"slots": 16, "max_prefixes": 32, **engine_args}
        judge_engine = load_engine(engine_name, **engine_args)
        return load_reward_model("judge", engine=judge_engine, **args), [judge_engine]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "args": dict(self.args)}


@dataclass(frozen=True)
class SearchSpec:
    """Sampling, strategy and reward model: everything a search needs besides the
    engine and the problems."""

    strategy: str = DEFAULT_STRATEGY
    params: StrategyParams | None = None
    """The strategy's parameters [default: its Params() defaults]."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    reward_model: RewardModelSpec = field(default_factory=RewardModelSpec)

    def __post_init__(self) -> None:
        impl = STRATEGIES.get(self.strategy)
        if self.params is None:
            object.__setattr__(self, "params", impl.Params())
        elif not isinstance(self.params, impl.Params):
            raise SpecError(f"strategy {self.strategy!r} takes {impl.Params.__name__}, got {type(self.params).__name__}")
        if impl.needs_prm and self.reward_model.name is None:
            raise SpecError(f"strategy {self.strategy!r} needs a reward model: --prm judge (the policy's own "
                            "model asked about each step), or --prm served --prm-arg base_url=...")

    @classmethod
    def build(cls, strategy: str = DEFAULT_STRATEGY, params: dict[str, Any] | None = None,
              sampling: SamplingParams | None = None, prm: str | None = None,
              prm_args: dict[str, Any] | None = None) -> "SearchSpec":
        return cls(strategy, strategy_params(strategy, params), sampling or SamplingParams(),
                   RewardModelSpec(prm, dict(prm_args or {})))

    @property
    def independent(self) -> bool:
        """Independent samples: an extendable run whose N is not in its identity."""
        return bool(getattr(STRATEGIES.get(self.strategy), "independent", False))

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "params": self.params.to_dict(), "sampling": self.sampling.to_dict(),
                "reward_model": self.reward_model.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchSpec":
        sampling = dict(d.get("sampling") or {})
        if "stop" in sampling:
            sampling["stop"] = tuple(sampling["stop"])
        rm = d.get("reward_model") or {}
        return cls.build(d.get("strategy", DEFAULT_STRATEGY), d.get("params"), SamplingParams(**sampling),
                         rm.get("name"), rm.get("args"))
