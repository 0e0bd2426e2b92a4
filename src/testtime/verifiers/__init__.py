"""Verifiers, registered by name."""

from . import math_answer  # noqa: F401  (registers the verifier)
from .base import VERDICTS, VERIFIERS, Verdict, Verifier, load_verifier
from .math_answer import MathAnswerVerifier, extract_answer

__all__ = ["VERDICTS", "VERIFIERS", "Verdict", "Verifier", "load_verifier",
           "MathAnswerVerifier", "extract_answer"]
