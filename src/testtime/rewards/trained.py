"""`trained`: a step verifier trained here (`testtime train-verifier`, `testtime.learned`)
as a reward model, for every selector and search strategy:

    --prm trained --prm-arg path=verifier.npz

A step's score is the verifier's P(the step leads to a verified answer): from the
frozen feature model's hidden states (an `.npz` file, `testtime.learned`), or from a
fine-tuned model's value head (a safetensors file, `testtime.finetune`; needs torch).
The model must be the file the verifier was trained with (checked by fingerprint);
it is found as it was named at training time, or given with `--prm-arg model=...`.
Scoring costs one forward pass over each solution (for the frozen features, the
question's tokens shared between samples of one problem; a fine-tuned verifier
scores the items of one call in batches), counted in `usage` like a judge's.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError
from ..flops import Usage
from .base import REWARD_MODELS, Scoring


@REWARD_MODELS.register("trained")
class TrainedPRM:
    name = "trained"

    def __init__(self, path: str | Path | None = None, model: str | Path | None = None, n_threads: int | None = None):
        """path: the verifier file. model: its feature model [default: as named when it was trained]."""
        from ..learned import open_verifier

        if path is None:
            raise InputError("the trained reward model needs its file: --prm-arg path=verifier.npz "
                             "(made by testtime train-verifier)")
        self.path = Path(path)
        self.verifier, self.features = open_verifier(self.path, model, n_threads)
        self.delimiter = self.verifier.meta["delimiter"]
        with open(self.path, "rb") as f:
            self._sha = hashlib.file_digest(f, "sha256").hexdigest()[:12]  # in chunks: a fine-tune is 200 MB
        self._lock = threading.Lock()  # one llama.cpp context: concurrent requests take turns
        self.usage = Usage()
        """Every token the feature model computed for this reward model."""

    def identity(self) -> dict[str, Any]:
        return {"reward_model": "trained", "file": self._sha, "features": self.verifier.meta["features"]}

    def shape(self) -> Any:
        return self.features.shape()

    def score(self, items: Sequence[Scoring]) -> list[list[float]]:
        if hasattr(self.features, "scores"):  # a fine-tuned verifier scores a batch in one pass
            todo = [k for k, it in enumerate(items) if it.steps[it.known:]]
            with self._lock:
                got = self.features.scores([(items[k].question, items[k].steps) for k in todo], self.delimiter)
                used = self.features.last_usage
            self.usage += used
            out: list[list[float]] = [[] for _ in items]
            for k, p in zip(todo, got):
                out[k] = [float(v) for v in p[items[k].known:]]
            return out
        out = []
        for it in items:
            if not it.steps[it.known:]:
                out.append([])
                continue
            with self._lock:
                X = self.features.features(it.question, it.steps, self.delimiter)
                used = self.features.last_usage
            self.usage += used
            out.append([float(v) for v in self.verifier.predict(X[it.known:])])
        return out

    def close(self) -> None:
        self.features.close()
