"""A verifier learned from the policy's own rollouts, trained on a CPU in minutes.

Features: the frozen embedded model reads the problem and the solution (its own
chat template, the question as the user's turn, the steps as the assistant's
text) once, and each step is described by the last hidden state at its final
token and the mean hidden state over its tokens (after the model's final norm;
llama.cpp returns them with `embeddings=True`), or the residual stream after chosen
blocks (`layers`, read through llama.cpp's eval callback; "auto" in `api.train_verifier`
keeps the block that cross-validates best). A causal model's state at a step's
end does not depend on later steps, so one pass gives every step's features, and
samples of the same problem share the question's KV cache.

Model: scikit-learn's logistic regression on standardised features, fitted to
Monte Carlo step labels (`testtime.labels`): soft labels as weighted 0/1 rows
(the cross-entropy against the fraction of verified rollouts), or hard labels.
Two fits compete: pooled, and within-problem (features centred per problem, so
the weights come from what tells a good step from a bad one *of the same
problem*, not from what tells an easy problem from a hard one; its score is then
calibrated to a probability). Selection ranks the candidates of one problem, so
the fit and the regularisation C are chosen by how well their out-of-fold
predictions (cross-validation grouped by problem) rank the solutions within each
problem by their last step; the decision threshold (for step accuracy and first-error location)
comes from the same predictions. Nothing is fitted on held-out problems.

The saved file is a plain `.npz` (arrays and one JSON header; no pickle, so
loading a file runs no code): scaler, weights, threshold, the feature model's
fingerprint, the labels it learned from, and the problems it saw (hashes of
their text), so an evaluation can prove it never saw its problems.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .engines.base import Request
from .errors import InputError
from .files import atomic_path
from .flops import Usage
from .rewards.base import split_steps
from .spec import SamplingParams
from .store import Store

FORMAT = "testtime-verifier/1"
TARGETS = ("soft", "hard")
FITS = ("pooled", "within")


def problem_key(question: str) -> str:
    """A problem's identity for splits: its text, so it holds across tasks, seeds and runs."""
    return hashlib.sha256(question.strip().encode()).hexdigest()[:16]


class HiddenStates:
    """Step features from a frozen llama.cpp model (see the module's docstring)."""

    def __init__(self, model: str | Path | None = None, seq_ctx: int = 2048, n_threads: int | None = None,
                 chat_template: str | None = None, layers: Sequence[int] = ()):
        """layers: the residual streams after these blocks (0-based), side by side, in
        place of the final hidden state; middle layers often carry more about whether a
        step is right than the last one, which is shaped for the next token."""
        from .engines.llamacpp import LlamaCppEngine

        self.model_arg = None if model is None else str(model)
        self.layers = tuple(int(i) for i in layers)
        self.engine = LlamaCppEngine(model, slots=1, max_prefixes=1, seq_ctx=seq_ctx, n_threads=n_threads,
                                     chat_template=chat_template, token_stats=False,
                                     embeddings=not self.layers, layers=self.layers)
        self.llm = self.engine.llm
        self.width = self.llm.n_embd * max(1, len(self.layers))
        """Columns of one token's state."""
        self.dim = 2 * self.width
        self.usage = Usage()
        """Every token the feature model computed."""
        self.last_usage = Usage()
        self._head: list[int] = []  # the prompt whose KV cells sequence 0 holds
        # outputs (the LM head's rows) are needed for the final state, and for the last
        # block's stream, which llama.cpp cuts to the output rows; a middle block's
        # stream holds every token anyway, so reading only those skips the LM head
        self._outputs = not self.layers or self.llm.n_layer - 1 in self.layers

    def identity(self) -> dict[str, Any]:
        return {"features": "hidden_state_end_mean", **({"layers": list(self.layers)} if self.layers else {}),
                "model": self.engine.identity()}

    def shape(self) -> Any:
        return self.engine.shape()

    def _tokens(self, question: str, text: str) -> list[int]:
        req = Request(key=0, seeds=(0,), params=SamplingParams(max_tokens=1),
                      messages=({"role": "user", "content": question},), continuation=text)
        return self.engine.prefix_tokens(req)

    def features(self, question: str, steps: Sequence[str], delimiter: str) -> np.ndarray:
        """One row per step: [hidden state at the step's last token, mean over its tokens].
        What it computed is added to `usage` and kept as `last_usage`."""
        self.last_usage = Usage()
        if not steps:
            return np.zeros((0, self.dim), np.float32)
        head, full, ends = step_layout(self._tokens, question, steps, delimiter)
        limit = self.engine.seq_ctx
        if len(full) > limit:
            raise InputError(f"a solution of {len(full)} tokens (with its question) exceeds the feature model's "
                             f"{limit}-token context; raise seq_ctx")
        states = self._states(head, full)  # hidden states of full[len(head):]
        rows = np.zeros((len(steps), self.dim), np.float32)
        start = len(head)
        for k, end in enumerate(ends):
            block = states[start - len(head):end - len(head) + 1]
            rows[k, :self.width] = states[end - len(head)]
            rows[k, self.width:] = block.mean(axis=0)
            start = end + 1 if end + 1 < len(full) else end
        return rows

    def _states(self, head: list[int], full: list[int]) -> np.ndarray:
        llm, n_batch = self.llm, self.llm.n_batch
        reused = head == self._head and len(head) > 0
        if not reused:  # compute the question's prompt once into sequence 0
            llm.seq_rm(0)
            self._head = []
            for i in range(0, len(head), n_batch):
                part = head[i:i + n_batch]
                llm.decode(np.asarray(part, np.int32), np.arange(i, i + len(part), dtype=np.int32),
                           np.zeros(len(part), np.int32), np.zeros(len(part), np.int8))
                llm.drop_layer_states()  # the question's states are not features
            self._head = list(head)
        llm.seq_rm(1)
        llm.seq_cp(0, 1)
        out = []
        for i in range(len(head), len(full), n_batch):
            part = full[i:i + n_batch]
            flags = np.ones(len(part), np.int8) if self._outputs else np.zeros(len(part), np.int8)
            llm.decode(np.asarray(part, np.int32), np.arange(i, i + len(part), dtype=np.int32),
                       np.ones(len(part), np.int32), flags)
            out.append(llm.layer_states() if self.layers else llm.embeddings(len(part)))
        self.last_usage = Usage.of(len(full), len(head) if reused else 0, 0)
        self.usage += self.last_usage
        return np.concatenate(out) if out else np.zeros((0, self.width), np.float32)

    def close(self) -> None:
        self.engine.close()


def features_for(meta: dict[str, Any], source: str | Path, model: str | Path | None = None,
                 n_threads: int | None = None) -> HiddenStates:
    """The feature model a verifier was trained with (its layers, and its file unless
    `model` names another copy), checked by fingerprint against the verifier's `meta`;
    `source` names the verifier in errors."""
    trained = meta["features"]
    f = HiddenStates(model if model is not None else meta.get("feature_model"), n_threads=n_threads,
                     layers=trained.get("layers", ()))
    want, got = trained["model"].get("fingerprint"), f.identity()["model"].get("fingerprint")
    if want != got:
        name = f.identity()["model"].get("model")
        f.close()
        raise InputError(f"{source} was trained on the hidden states of {trained['model'].get('model')} "
                         f"(fingerprint {want}); {name} (fingerprint {got}) is another model: give the same file "
                         "as the feature model (model=...)")
    return f


def open_verifier(path: str | Path, model: str | Path | None = None, n_threads: int | None = None) -> tuple[Any, Any]:
    """(verifier, features) of a trained verifier file of either kind (this module's `.npz`,
    or `testtime.finetune`'s safetensors): `features.features(question, steps, delimiter)`
    gives the rows that `verifier.predict` turns into step scores; close `features` when
    done. `model`: another copy of the model it was trained on."""
    from .finetune import FineTuned, is_finetuned

    if is_finetuned(path):
        v = FineTuned.load(path, model, n_threads)
        return v, v
    v = Verifier.load(path)
    return v, features_for(v.meta, path, model, n_threads)


def verifier_header(path: str | Path) -> tuple[dict[str, Any], float]:
    """(meta, threshold) of a trained verifier file of either kind, without loading a
    model: what it was trained on (`meta["train_problems"]`: problem keys), how, and
    its decision threshold."""
    from .finetune import is_finetuned, read_header

    if is_finetuned(path):
        return read_header(path)
    v = Verifier.load(path)  # a few arrays
    return v.meta, v.threshold


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def step_layout(tokens: Callable[[str, str], list[int]], question: str, steps: Sequence[str],
                delimiter: str) -> tuple[list[int], list[int], list[int]]:
    """Where a solution's steps end in its tokens: (the prompt's tokens, the whole
    rendering's tokens, the index in the latter of each step's last token). `tokens`
    renders (question, answer text) in the model's chat format. A step's end is where
    the rendering of the steps up to it stops agreeing with the whole one, never
    inside the prompt, and after the previous step's end while tokens remain."""
    head = tokens(question, "")
    full = tokens(question, delimiter.join(steps))
    if full[:len(head)] != head:  # a template that renders an empty answer differently
        head = head[:_common(head, full)]
    ends, start = [], len(head)
    for k in range(len(steps)):
        toks = tokens(question, delimiter.join(steps[:k + 1]))
        end = max(max(len(head), _common(toks, full)) - 1, start)  # every step keeps a token of its own
        ends.append(end)
        start = end + 1 if end + 1 < len(full) else end
    return head, full, ends


# -- data -----------------------------------------------------------------------

@dataclass
class StepData:
    """Labelled steps: one row per step of every labelled solution."""

    X: np.ndarray
    soft: np.ndarray
    """Fraction of rollouts from the step that were verified."""
    sample: np.ndarray
    """Row -> index of its solution in `solutions`."""
    step: np.ndarray
    solutions: list[tuple[str, str, int]] = field(default_factory=list)
    """(run id, problem id, sample index) of each solution."""
    groups: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    """Row -> problem (by text), for splits grouped by problem."""
    problems: dict[str, str] = field(default_factory=dict)
    """Problem key -> question."""

    @property
    def hard(self) -> np.ndarray:
        return self.soft > 0


@dataclass
class Labelled:
    """One solution to learn from or to evaluate on: its steps and their labels."""

    run_id: str
    problem_id: str
    sample_index: int
    question: str
    key: str
    """`problem_key(question)`."""
    steps: list[str]
    soft: list[float]
    """Per step, the fraction of its rollouts that were verified; for an outcome-only
    solution one value, its verdict, which belongs to its last step."""
    only_last: bool


OUTCOMES = ("all", "mixed", "none")


def outcome_mode(outcomes: bool | str) -> str:
    """`outcomes` as one of OUTCOMES (True: "all", False: "none")."""
    mode = ("all" if outcomes else "none") if isinstance(outcomes, bool) else outcomes
    if mode not in OUTCOMES:
        raise InputError(f"outcomes must be one of {', '.join(OUTCOMES)}, got {outcomes!r}")
    return mode


def labelled_solutions(store: Store, sources: Sequence[tuple[str, str]], exclude: Iterable[str] = (),
                       outcomes: bool | str = False, outcomes_per_problem: int = 0) -> Iterator[Labelled]:
    """The labelled samples of (run id, labeler) pairs, leaving out problems whose key is in
    `exclude`. `outcomes`: also graded samples without step labels, their last step
    labelled by their verdict (outcome supervision, free): "all" (or True) of them;
    "mixed": only on problems where the run has both a verified and a failed sample (the
    others cannot teach which of a problem's samples to prefer, which is what selection
    asks); "none" (or False). `outcomes_per_problem`: at most this many such samples per
    problem and run, the lowest sample indices (the store's order is random by seed); 0: no cap."""
    from .export import REJECTABLE

    mode = outcome_mode(outcomes)
    if outcomes_per_problem < 0:
        raise InputError(f"outcomes_per_problem must be >= 0 (0: no cap), got {outcomes_per_problem}")
    skip = set(exclude)
    for run_id, labeler in sources:
        info = store.labelers(run_id).get(labeler)
        if info is None:
            raise InputError(f"run {run_id} has no labels from labeler {labeler!r}")
        labels = store.step_labels(run_id, labeler)
        verdicts = {(r[0], r[1]): r[2] for r in store.db.execute(
            "SELECT problem_id, sample_index, verdict FROM verdicts WHERE run_id = ? AND verifier = ?",
            (run_id, info["verifier"]))} if mode != "none" else {}
        verdicts = {k: v for k, v in verdicts.items() if v == "pass" or v in REJECTABLE}
        if mode == "mixed":
            seen: dict[str, set[bool]] = {}
            for (pid, _), v in verdicts.items():
                seen.setdefault(pid, set()).add(v == "pass")
            verdicts = {k: v for k, v in verdicts.items() if len(seen[k[0]]) == 2}
        if outcomes_per_problem:
            kept: dict[str, list[int]] = {}
            for pid, i in sorted(k for k in verdicts if k not in labels):
                kept.setdefault(pid, []).append(i)
            verdicts = {k: v for k, v in verdicts.items()
                        if k in labels or k[1] in kept[k[0]][:outcomes_per_problem]}
        questions = {p["problem_id"]: p["question"] for p in store.problems(run_id)}
        for s in store.samples(run_id):
            rows = labels.get((s.problem_id, s.sample_index))
            q = questions[s.problem_id]
            key = problem_key(q)
            if key in skip:
                continue
            steps = split_steps(s.text, info["delimiter"])
            only_last = False
            if rows is None:
                v = verdicts.get((s.problem_id, s.sample_index))
                if v is None or not steps:
                    continue
                rows, only_last = [(1, int(v == "pass"))], True
            elif len(steps) != len(rows):
                raise InputError(f"run {run_id} sample {s.problem_id}/{s.sample_index}: {len(steps)} steps but "
                                 f"{len(rows)} labels (labeler {labeler})")
            yield Labelled(run_id, s.problem_id, s.sample_index, q, key, steps, [p / r for r, p in rows], only_last)


def step_data(store: Store, sources: Sequence[tuple[str, str]], features: Any, exclude: Iterable[str] = (),
              outcomes: bool | str = False, progress: Any = None, outcomes_per_problem: int = 0) -> StepData:
    """Features and labels of `labelled_solutions(store, sources, exclude, outcomes,
    outcomes_per_problem)`, a row per labelled step; `features` has `features(question, steps, delimiter)` (a
    `HiddenStates`; or a `finetune.FineTuned`, whose one column is its score)."""
    X, soft, sample, step, groups, sols, problems = [], [], [], [], [], [], {}
    group_ids: dict[str, int] = {}
    delimiters = {run_id: store.labelers(run_id).get(labeler, {}).get("delimiter") for run_id, labeler in sources}
    for sol in labelled_solutions(store, sources, exclude, outcomes, outcomes_per_problem):
        problems[sol.key] = sol.question
        g = group_ids.setdefault(sol.key, len(group_ids))
        feats = features.features(sol.question, sol.steps, delimiters[sol.run_id])
        X.append(feats[-1:] if sol.only_last else feats)
        soft.extend(sol.soft)
        sample.extend([len(sols)] * len(sol.soft))
        step.extend([len(sol.steps) - 1] if sol.only_last else range(len(sol.soft)))
        groups.extend([g] * len(sol.soft))
        sols.append((sol.run_id, sol.problem_id, sol.sample_index))
        if progress:
            progress(1)
    if not sols:
        raise InputError("no labelled samples to learn from (label a run first: testtime label RUN)")
    return StepData(np.concatenate(X), np.asarray(soft, float), np.asarray(sample), np.asarray(step),
                    sols, np.asarray(groups), problems)


# -- the model --------------------------------------------------------------------

@dataclass
class TrainConfig:
    target: str = "soft"
    """soft: fit the fraction of verified rollouts; hard: whether any was verified."""
    cs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    """Regularisation strengths to choose from by grouped cross-validation."""
    fits: tuple[str, ...] = ("pooled", "within")
    """Fits to choose from by cross-validation: pooled, and within-problem (`_fit_within`)."""
    folds: int = 5
    seed: int = 0

    def check(self) -> None:
        if self.target not in TARGETS:
            raise InputError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if not self.cs or any(c <= 0 for c in self.cs):
            raise InputError(f"cs must be positive regularisation strengths, got {self.cs}")
        if not self.fits or any(f not in FITS for f in self.fits):
            raise InputError(f"fits must be among {', '.join(FITS)}, got {self.fits}")
        if self.folds < 2:
            raise InputError(f"folds must be >= 2, got {self.folds}")


def _rows(X: np.ndarray, soft: np.ndarray, target: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, y, weight) for a classifier: a soft label p is a 1-row of weight p and a 0-row of weight 1-p."""
    if target == "hard":
        return X, (soft > 0).astype(int), np.ones(len(soft))
    Xs = np.concatenate([X, X])
    y = np.concatenate([np.ones(len(soft), int), np.zeros(len(soft), int)])
    w = np.concatenate([soft, 1 - soft])
    keep = w > 0
    return Xs[keep], y[keep], w[keep]


def _fit(X: np.ndarray, soft: np.ndarray, target: str, c: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X)
    Xr, y, w = _rows(scaler.transform(X), soft, target)
    if len(set(y.tolist())) < 2:
        raise InputError("the labels are all one kind (every step good, or every step bad): nothing to learn; "
                         "label more samples, or with select=balanced")
    clf = LogisticRegression(C=c, max_iter=5000).fit(Xr, y, sample_weight=w)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    return scaler.mean_, scale, clf.coef_[0], float(clf.intercept_[0])


def _predict(X: np.ndarray, mean, scale, coef, intercept) -> np.ndarray:
    z = ((X - mean) / scale) @ coef + intercept
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


def _log_loss(p: np.ndarray, soft: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(soft * np.log(p) + (1 - soft) * np.log(1 - p)))


def best_threshold(p: np.ndarray, hard: np.ndarray) -> float:
    """The threshold on P(good step) that maximises the macro F1 (mean of the F1 of good
    steps and of bad ones: neither class's abundance decides); 0.5 with one class only."""
    if hard.all() or not hard.any():
        return 0.5
    best, best_f1 = 0.5, -1.0
    for t in np.unique(np.round(p, 4)):
        f1 = macro_f1(hard, p >= t)
        if f1 > best_f1:
            best, best_f1 = float(t), f1
    return best


def macro_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    return (f1_score(truth, pred) + f1_score(~truth, ~pred)) / 2


def f1_score(truth: np.ndarray, pred: np.ndarray) -> float:
    tp = float(np.sum(truth & pred))
    fp = float(np.sum(~truth & pred))
    fn = float(np.sum(truth & ~pred))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


@dataclass
class Verifier:
    """A trained step verifier: P(a step leads to a verified answer) from its features."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    threshold: float
    meta: dict[str, Any]

    def predict(self, X: np.ndarray) -> np.ndarray:
        return _predict(X, self.mean, self.scale, self.coef, self.intercept)

    @property
    def problems(self) -> set[str]:
        """Keys of the problems it was trained on."""
        return set(self.meta["train_problems"])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        header = json.dumps({"format": FORMAT, **self.meta, "threshold": self.threshold})
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: numpy adds no suffix
            np.savez(f, mean=self.mean, scale=self.scale, coef=self.coef, intercept=np.float64(self.intercept),
                     header=np.array(header))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Verifier":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"no trained verifier at {path} (make one with testtime train-verifier)")
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                arrays = {k: np.array(z[k]) for k in ("mean", "scale", "coef", "intercept")}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # JSONDecodeError is a ValueError
            raise InputError(f"{path} is not a trained verifier file ({type(e).__name__}: {e})") from None
        if header.get("format") != FORMAT:
            raise InputError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
        threshold = header.pop("threshold")
        header.pop("format")
        if not (arrays["mean"].shape == arrays["scale"].shape == arrays["coef"].shape):
            raise InputError(f"{path}: its arrays disagree in size; the file is damaged")
        return cls(arrays["mean"], arrays["scale"], arrays["coef"], float(arrays["intercept"]), float(threshold), header)


def _demean(X: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each row minus the mean of its problem's rows."""
    out = X.astype(float, copy=True)
    for g in np.unique(groups):
        m = groups == g
        out[m] -= out[m].mean(axis=0)
    return out


def _fit_within(X: np.ndarray, soft: np.ndarray, groups: np.ndarray, target: str,
                c: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Weights from differences between steps of the same problem only (a fixed-effects
    logistic regression: features centred per problem), so that what tells problems
    apart (their difficulty) does not stand in for what tells a good step from a bad
    one; then its score on raw features is calibrated to a probability (Platt)."""
    _, scale, w, _ = _fit(_demean(X, groups), soft, target, c)
    z = (X / scale) @ w
    zm, zs, a, b = _fit(z[:, None], soft, target, 1e4)
    k = float(a[0] / zs[0])
    return np.zeros_like(scale), scale, w * k, float(b - k * zm[0])


def within_auc(p: np.ndarray, hard: np.ndarray, groups: np.ndarray, rows: np.ndarray | None = None) -> float | None:
    """Mean over problems (with both kinds of row) of the AUC among that problem's rows
    (`rows`: a mask of the rows to rank, e.g. solutions' last steps): how well the
    verifier ranks the candidates of one problem, which is what selection uses."""
    keep = np.ones(len(p), bool) if rows is None else rows
    vals = [_auc(p[keep & (groups == g)], hard[keep & (groups == g)]) for g in np.unique(groups[keep])]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def last_steps(data: "StepData") -> np.ndarray:
    """Mask of each solution's last row: its final answer's label."""
    mask = np.zeros(len(data.sample), bool)
    last: dict[int, int] = {}
    for r, s in enumerate(data.sample.tolist()):
        last[s] = r
    mask[list(last.values())] = True
    return mask


def train(data: StepData, cfg: TrainConfig = TrainConfig(), meta: dict[str, Any] | None = None) -> Verifier:
    """Fit the verifier. Two fits compete, each at every C: pooled (all rows as they are)
    and within-problem (`_fit_within`). Out-of-fold predictions, grouped by problem,
    choose the fit and C by how well they rank the solutions of one problem by their
    last step (`within_auc` over `last_steps`, as best-of-N does; log loss breaks
    ties), and the threshold by macro F1 over every step."""
    from sklearn.model_selection import GroupKFold

    cfg.check()
    t0 = time.perf_counter()
    n_groups = len(set(data.groups.tolist()))
    folds = min(cfg.folds, n_groups)
    if folds < 2:
        raise InputError(f"the labels cover {n_groups} problem; cross-validation needs at least 2")
    splits = list(GroupKFold(n_splits=folds).split(data.X, groups=data.groups))
    truth = data.soft if cfg.target == "soft" else data.hard.astype(float)

    def fit(kind: str, rows: np.ndarray, c: float):
        if kind == "within":
            return _fit_within(data.X[rows], data.soft[rows], data.groups[rows], cfg.target, c)
        return _fit(data.X[rows], data.soft[rows], cfg.target, c)

    cv: dict[tuple[str, float], np.ndarray] = {}
    for kind in cfg.fits:
        for c in cfg.cs:
            oof = np.full(len(data.soft), np.nan)
            for tr, te in splits:
                try:
                    oof[te] = _predict(data.X[te], *fit(kind, tr, c))
                except InputError:  # a fold with one kind of label: predict the training mean
                    oof[te] = float(np.mean(truth[tr]))
            cv[kind, c] = oof
    finals = last_steps(data)  # best-of-N ranks a problem's solutions by their last step's score
    scores = {k: (within_auc(p, data.hard, data.groups, finals) or 0.5, -_log_loss(p, truth)) for k, p in cv.items()}
    best = max(scores, key=lambda k: (scores[k], -k[1]))
    kind, c = best
    oof = cv[best]
    threshold = best_threshold(oof, data.hard)
    mean, scale, coef, intercept = fit(kind, np.arange(len(data.soft)), c)
    info = {
        "train_problems": sorted(data.problems),
        "train_solutions": len(data.solutions),
        "train_steps": int(len(data.soft)),
        "good_steps": int(data.hard.sum()),
        "config": {**asdict(cfg), "cs": list(cfg.cs), "fits": list(cfg.fits)},
        "fit": kind,
        "c": c,
        "cv": {f"{k}/C={cc}": {"within_auc": v[0], "log_loss": -v[1]} for (k, cc), v in scores.items()},
        "cv_step_accuracy": float(np.mean((oof >= threshold) == data.hard)),
        "cv_step_f1": macro_f1(data.hard, oof >= threshold),
        "cv_auc": _auc(oof, data.hard),
        "cv_within_auc": within_auc(oof, data.hard, data.groups, finals),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return Verifier(mean, scale, coef, intercept, threshold, {**(meta or {}), **info})


def layer_columns(data: StepData, k: int, n_layers: int) -> StepData:
    """The steps described by the k-th of `n_layers` layers read side by side
    (`HiddenStates(layers=...)`: every layer's end states, then every layer's means)."""
    width = data.X.shape[1] // (2 * n_layers)
    cols = np.r_[k * width:(k + 1) * width, (n_layers + k) * width:(n_layers + k + 1) * width]
    return StepData(data.X[:, cols], data.soft, data.sample, data.step, data.solutions, data.groups, data.problems)


def train_choosing_layer(data: StepData, layers: Sequence[int], cfg: TrainConfig, meta: dict[str, Any]) -> Verifier:
    """One verifier per layer (`data` read with `HiddenStates(layers=layers)`), keeping the
    one whose cross-validated predictions rank a problem's solutions best (the criterion
    `train` chooses its fit and C by; log loss breaks ties). Nothing but the training
    data decides. `meta["features"]` becomes the chosen layer's; every layer's figures
    are kept under "layer_cv"."""
    fitted = {}
    for k, layer in enumerate(layers):
        v = train(layer_columns(data, k, len(layers)), cfg, meta)
        fitted[layer] = v
    key = {layer: (v.meta["cv_within_auc"] or 0.5, -v.meta["cv"][f"{v.meta['fit']}/C={v.meta['c']}"]["log_loss"])
           for layer, v in fitted.items()}
    best = max(layers, key=lambda layer: key[layer])
    v = fitted[best]
    v.meta["features"] = {**v.meta["features"], "layers": [best]}
    v.meta["layer_cv"] = {str(layer): {"within_auc": f.meta["cv_within_auc"], "auc": f.meta["cv_auc"],
                                       "step_f1": f.meta["cv_step_f1"], "fit": f.meta["fit"], "c": f.meta["c"]}
                          for layer, f in fitted.items()}
    return v


def auto_layers(n_layer: int) -> tuple[int, ...]:
    """The blocks `--layer auto` chooses among: every fourth from the fourth, and the last."""
    return tuple(sorted(set(range(3, n_layer, 4)) | {n_layer - 1}))


def _auc(p: np.ndarray, y: np.ndarray) -> float | None:
    """Area under the ROC curve (P(a good step outscores a bad one), ties half)."""
    pos, neg = p[y], p[~y]
    if not len(pos) or not len(neg):
        return None
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    vals = np.concatenate([pos, neg])[order]
    i = 0
    while i < len(vals):  # average ranks over ties
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


# -- evaluation --------------------------------------------------------------------

def step_metrics(p: np.ndarray, data: StepData, threshold: float) -> dict[str, Any]:
    """Step-level accuracy and F1 against Monte Carlo hard labels (macro: the mean of the
    good and the bad steps' F1, as most steps of a weak model are bad),
    and ProcessBench's first-error measure: per solution, the first step predicted bad
    (or none) against the first step labelled bad (or none); accuracy on solutions
    with an error, on those without, and their harmonic mean."""
    hard = data.hard
    pred_good = p >= threshold
    first_true, first_pred = {}, {}
    for i in range(len(p)):
        s = int(data.sample[i])
        first_true.setdefault(s, -1)
        first_pred.setdefault(s, -1)
        if not hard[i] and first_true[s] == -1:
            first_true[s] = int(data.step[i])
        if not pred_good[i] and first_pred[s] == -1:
            first_pred[s] = int(data.step[i])
    erroneous = [s for s in first_true if first_true[s] >= 0]
    correct = [s for s in first_true if first_true[s] < 0]
    acc_err = float(np.mean([first_pred[s] == first_true[s] for s in erroneous])) if erroneous else None
    acc_ok = float(np.mean([first_pred[s] == -1 for s in correct])) if correct else None
    both = None if acc_err is None or acc_ok is None or acc_err + acc_ok == 0 else \
        2 * acc_err * acc_ok / (acc_err + acc_ok)
    return {"steps": int(len(p)), "solutions": len(first_true), "good_steps": int(hard.sum()),
            "step_accuracy": float(np.mean(pred_good == hard)), "step_f1": macro_f1(hard, pred_good),
            "step_f1_good": f1_score(hard, pred_good), "step_f1_bad": f1_score(~hard, ~pred_good),
            "auc": _auc(p, hard), "within_auc": within_auc(p, hard, data.groups, last_steps(data)),
            "log_loss": _log_loss(p, data.soft),
            "first_error_acc_erroneous": acc_err, "first_error_acc_correct": acc_ok, "first_error_f1": both}

