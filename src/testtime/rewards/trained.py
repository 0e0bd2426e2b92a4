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
import json
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from ..flops import Usage
from .base import REWARD_MODELS, Scoring


def weights_digest(path: str | Path) -> str:
    """A hash of what decides a verifier file's scores: its weights (the arrays of an
    `.npz`, the tensors of a safetensors file with their names, shapes and types) and
    the features they read, not its provenance or timings. Two trainings that end in
    the same weights share the scores stored under this reward model's identity, though
    their headers differ in how long they took or which problems they left out."""
    from ..finetune import is_finetuned

    h = hashlib.sha256()
    if is_finetuned(path):
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            layout = json.loads(f.read(n))
            meta = json.loads((layout.pop("__metadata__", None) or {}).get("testtime", "{}"))
            h.update(json.dumps(layout, sort_keys=True).encode())
            while chunk := f.read(1 << 20):  # in chunks: a fine-tune is 200 MB
                h.update(chunk)
    else:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["header"]))
            for name in sorted(set(z.files) - {"header"}):
                a = np.ascontiguousarray(z[name])
                h.update(f"{name} {a.dtype.str} {a.shape}".encode() + a.tobytes())
    h.update(json.dumps(meta.get("features"), sort_keys=True).encode())
    return h.hexdigest()[:12]


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
        self._sha = weights_digest(self.path)
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
