"""Engines, registered by name. Importing them is cheap: llama.cpp's library is
loaded only when a LlamaCppEngine is built."""

from . import llamacpp, openai, toy, vllm  # noqa: F401  (registers the engines; each imports its library when built)
from .base import ENGINES, Completion, Engine, Request, TokenLogprob, load_engine

__all__ = ["ENGINES", "Completion", "Engine", "Request", "TokenLogprob", "load_engine"]
