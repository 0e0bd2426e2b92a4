"""Verifiers, registered by name."""

from . import code, math_answer, response  # noqa: F401  (registers the verifiers)
from .base import VERDICTS, VERIFIERS, Verdict, Verifier, load_verifier
from .code import CodeVerifier, assemble
from .math_answer import MathAnswerVerifier, extract_answer

__all__ = ["VERDICTS", "VERIFIERS", "Verdict", "Verifier", "load_verifier",
           "MathAnswerVerifier", "extract_answer", "CodeVerifier", "assemble"]
