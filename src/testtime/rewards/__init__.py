"""Process reward models, registered by name: `judge` (any engine as a step judge),
`served` (a PRM behind HTTP), `confidence` (the policy's own token confidence) and
`trained` (a verifier trained here from Monte Carlo step labels)."""

from . import confidence, judge, served, trained  # noqa: F401  (registers the reward models)
from .confidence import ConfidenceScorer
from .base import REWARD_MODELS, RewardModel, Scoring, load_reward_model, split_steps
from .judge import JudgePRM
from .served import RewardServerError, ServedPRM
from .trained import TrainedPRM

__all__ = ["REWARD_MODELS", "RewardModel", "Scoring", "load_reward_model", "split_steps", "JudgePRM",
           "ServedPRM", "RewardServerError", "ConfidenceScorer", "TrainedPRM"]
