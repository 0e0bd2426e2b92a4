"""Search as data generation: verified samples as training data, in TRL's formats.

- `sft`: one row per verified sample, TRL's conversational prompt-completion
  type, which `SFTTrainer` reads (the loss falls on the completion only):
      {"prompt": [{"role": "system"|"user"|"assistant", "content": ...}, ...],
       "completion": [{"role": "assistant", "content": ...}], "metadata": {...}}
- `dpo`: (chosen, rejected) pairs from a verified and a failed sample of the same
  problem, TRL's conversational preference type, which `DPOTrainer` reads:
      {"prompt": [...], "chosen": [{"role": "assistant", ...}],
       "rejected": [{"role": "assistant", ...}], "metadata": {...}}

- `prm`: one row per labelled sample, TRL's standard stepwise-supervision type,
  which `PRMTrainer` reads; labels from `testtime label` (Monte Carlo rollouts):
      {"prompt": question, "completions": [step, ...], "labels": [bool, ...],
       "metadata": {..., "soft_labels": [fraction of rollouts verified, ...]}}
- `orm`: outcome labels in the same type, one step per row (the whole solution,
  labelled by the verifier): `PRMTrainer` on these rows trains an outcome reward
  model; no rollouts needed.

The prompt is the conversation the model was given (the run's template,
few-shot turns included unless `drop_shots`), and the assistant's content is
what it wrote: the template's opening of the answer (e.g. a code fence), then
the sample's text. A stop string that ended a sample is not part of its text.
Only samples the verifier passed are chosen; samples that failed, errored, timed
out or ran out of memory are rejected; infrastructure errors and ungraded
samples are neither. Samples cut off by max_tokens are left out of `sft` and of
`chosen` (they would teach the model not to stop). Identical texts count once.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError
from .files import atomic_path
from .analysis import pick_verifier
from .prompts import get_template
from .rewards.base import split_steps
from .store import Store

REJECTABLE = ("fail", "error", "timeout", "memory")


def run_template(store: Store, run_id: str, consequence: str):
    """The run's prompt template, refusing one whose text has changed since the run."""
    spec = store.run_spec(run_id)
    tmpl = get_template(spec.template["name"])
    if tmpl.identity() != spec.template:
        raise InputError(f"run {run_id} used template {spec.template['name']!r} with hash {spec.template.get('sha')}, "
                         f"but the template now has hash {tmpl.identity()['sha']}: the prompt the model saw "
                         f"cannot be rebuilt, so {consequence}")
    return tmpl


def _prompt_for(store: Store, run_id: str, drop_shots: bool):
    tmpl = run_template(store, run_id, "the export would be wrong")

    def messages(question: str) -> list[dict[str, str]]:
        msgs = tmpl.messages(question)
        if drop_shots:
            msgs = [m for m in msgs[:1] if m["role"] == "system"] + msgs[-1:]
        return msgs

    return messages, tmpl.continuation


def _graded(store: Store, run_id: str, verifier: str | None) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    verifier = pick_verifier(store, run_id, verifier)
    by_problem: dict[str, list[dict[str, Any]]] = {}
    for row in store.iter_export(run_id):
        v = row["verdicts"].get(verifier)
        if v is not None:
            by_problem.setdefault(row["problem_id"], []).append(dict(row, verdict=v["verdict"]))
    return verifier, by_problem


def _unique(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for r in sorted(rows, key=lambda r: r["sample_index"]):
        if r["text"] not in seen:
            seen.add(r["text"])
            out.append(r)
    return out


def sft_rows(store: Store, run_id: str, verifier: str | None = None, drop_shots: bool = False,
             max_per_problem: int | None = None) -> Iterator[dict[str, Any]]:
    verifier, by_problem = _graded(store, run_id, verifier)
    messages, opening = _prompt_for(store, run_id, drop_shots)
    for pid, rows in by_problem.items():
        good = _unique([r for r in rows if r["verdict"] == "pass" and r["finish_reason"] != "length"])
        for r in good[:max_per_problem]:
            yield {"prompt": messages(r["question"]),
                   "completion": [{"role": "assistant", "content": opening(r["question"]) + r["text"]}],
                   "metadata": {"run_id": run_id, "problem_id": pid, "sample_index": r["sample_index"],
                                "verifier": verifier, "reference": r["reference"]}}


def dpo_rows(store: Store, run_id: str, verifier: str | None = None, drop_shots: bool = False,
             pairs_per_problem: int = 4, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Up to `pairs_per_problem` pairs per problem with both kinds of sample; every
    chosen and every rejected sample is used before any is used twice."""
    if pairs_per_problem < 1:
        raise InputError(f"pairs_per_problem must be >= 1, got {pairs_per_problem}")
    verifier, by_problem = _graded(store, run_id, verifier)
    messages, opening = _prompt_for(store, run_id, drop_shots)
    for pid, rows in by_problem.items():
        good = _unique([r for r in rows if r["verdict"] == "pass" and r["finish_reason"] != "length"])
        bad = _unique([r for r in rows if r["verdict"] in REJECTABLE])
        if not good or not bad:
            continue
        rng = random.Random(f"{seed}/{pid}")
        rng.shuffle(good)
        rng.shuffle(bad)
        for i in range(min(pairs_per_problem, max(len(good), len(bad)))):
            c, r = good[i % len(good)], bad[i % len(bad)]
            q = c["question"]
            yield {"prompt": messages(q),
                   "chosen": [{"role": "assistant", "content": opening(q) + c["text"]}],
                   "rejected": [{"role": "assistant", "content": opening(q) + r["text"]}],
                   "metadata": {"run_id": run_id, "problem_id": pid, "chosen_index": c["sample_index"],
                                "rejected_index": r["sample_index"], "rejected_verdict": r["verdict"],
                                "verifier": verifier}}


def pick_labeler(store: Store, run_id: str, labeler: str | None) -> tuple[str, dict[str, Any]]:
    """The labeler asked for (a unique prefix will do), or the run's only one."""
    known = store.labelers(run_id)
    if not known:
        raise InputError(f"run {run_id} has no step labels: label it first (testtime label {run_id})")
    if labeler is None:
        if len(known) > 1:
            raise InputError(f"run {run_id} has {len(known)} sets of step labels ({', '.join(known)}); "
                             "choose one with --labeler")
        return next(iter(known.items()))
    hits = [k for k in known if k.startswith(labeler)]
    if len(hits) != 1:
        raise InputError(f"labeler {labeler!r} matches {len(hits)} of run {run_id}'s: {', '.join(known)}")
    return hits[0], known[hits[0]]


def prm_rows(store: Store, run_id: str, labeler: str | None = None,
             threshold: float | None = None) -> Iterator[dict[str, Any]]:
    """Labelled samples as stepwise supervision. A step's label is True when any rollout
    from it was verified (Math-Shepherd's hard estimate) or, with `threshold`, when at
    least that fraction was."""
    if threshold is not None and not 0 < threshold <= 1:
        raise InputError(f"threshold must be in (0, 1], got {threshold}")
    labeler, info = pick_labeler(store, run_id, labeler)
    labels = store.step_labels(run_id, labeler)
    questions = {p["problem_id"]: (p["question"], p["answer"]) for p in store.problems(run_id)}
    for s in store.samples(run_id):
        rows = labels.get((s.problem_id, s.sample_index))
        if rows is None:
            continue
        steps = split_steps(s.text, info["delimiter"])
        soft = [p / r for r, p in rows]
        hard = [p > 0 for _, p in rows] if threshold is None else [v >= threshold for v in soft]
        q, ref = questions[s.problem_id]
        yield {"prompt": q, "completions": steps, "labels": hard,
               "metadata": {"run_id": run_id, "problem_id": s.problem_id, "sample_index": s.sample_index,
                            "labeler": labeler, "soft_labels": soft, "rollouts": [r for r, _ in rows],
                            "reference": ref}}


def orm_rows(store: Store, run_id: str, verifier: str | None = None) -> Iterator[dict[str, Any]]:
    """Every graded sample as one step labelled by its verdict (outcome supervision).
    Infrastructure errors and ungraded samples are left out."""
    verifier, by_problem = _graded(store, run_id, verifier)
    for pid, rows in by_problem.items():
        for r in sorted(rows, key=lambda r: r["sample_index"]):
            if r["verdict"] != "pass" and r["verdict"] not in REJECTABLE:
                continue
            yield {"prompt": r["question"], "completions": [r["text"]], "labels": [r["verdict"] == "pass"],
                   "metadata": {"run_id": run_id, "problem_id": pid, "sample_index": r["sample_index"],
                                "verifier": verifier, "verdict": r["verdict"], "finish_reason": r["finish_reason"],
                                "reference": r["reference"]}}


def write_jsonl(rows: Iterator[dict[str, Any]], path: str | os.PathLike) -> tuple[Path, int]:
    """Written under a temporary name and renamed: never a half-written file."""
    path = Path(path)
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            count += 1
    return path, count
