"""The sample store: one SQLite file per workspace, in WAL mode.

One row per sample keyed by (run_id, problem_id, sample_index); verdicts in
their own table keyed by verifier, so re-grading never re-generates. Rows are
committed in small transactions as they arrive: SQLite's journal makes each
commit atomic, so a `kill -9` at any moment loses at most the samples not yet
committed and never leaves a torn row. Inserts are idempotent (a sample that
exists is never overwritten), so a resumed run can only add what is missing.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .errors import InfrastructureError, InputError, NotFoundError
from .files import atomic_path
from .spec import RunSpec

DB_NAME = "testtime.db"
ENV_WORKSPACE = "TESTTIME_WORKSPACE"
DEFAULT_WORKSPACE = "testtime-runs"

_SAMPLES_TABLE = """
CREATE TABLE IF NOT EXISTS samples (
    run_id          TEXT NOT NULL,
    problem_id      TEXT NOT NULL,
    sample_index    INTEGER NOT NULL,
    seed            INTEGER NOT NULL,
    text            TEXT NOT NULL,
    prompt_tokens   INTEGER NOT NULL,
    cached_tokens   INTEGER,
    completion_tokens INTEGER NOT NULL,
    finish_reason   TEXT NOT NULL,
    latency_s       REAL,
    created         REAL NOT NULL,
    reasoning       TEXT,
    PRIMARY KEY (run_id, problem_id, sample_index)
) WITHOUT ROWID;
"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    spec        TEXT NOT NULL,
    created     REAL NOT NULL,
    n_target    INTEGER NOT NULL DEFAULT 0,
    label       TEXT
);
CREATE TABLE IF NOT EXISTS problems (
    run_id      TEXT NOT NULL REFERENCES runs(run_id),
    problem_id  TEXT NOT NULL,
    position    INTEGER NOT NULL,
    question    TEXT NOT NULL,
    answer      TEXT,
    difficulty  INTEGER,
    meta        TEXT,
    PRIMARY KEY (run_id, problem_id)
) WITHOUT ROWID;
""" + _SAMPLES_TABLE + """
CREATE TABLE IF NOT EXISTS verdicts (
    run_id       TEXT NOT NULL,
    problem_id   TEXT NOT NULL,
    sample_index INTEGER NOT NULL,
    verifier     TEXT NOT NULL,
    verdict      TEXT NOT NULL,
    reason       TEXT,
    extracted    TEXT,
    created      REAL NOT NULL,
    PRIMARY KEY (run_id, problem_id, sample_index, verifier)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS run_models (
    run_id       TEXT NOT NULL,
    role         TEXT NOT NULL,
    shape        TEXT NOT NULL,
    PRIMARY KEY (run_id, role)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS step_scores (
    run_id       TEXT NOT NULL,
    problem_id   TEXT NOT NULL,
    sample_index INTEGER NOT NULL,
    scorer       TEXT NOT NULL,
    step         INTEGER NOT NULL,
    score        REAL NOT NULL,
    PRIMARY KEY (run_id, problem_id, sample_index, scorer, step)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS score_usage (
    run_id       TEXT NOT NULL,
    problem_id   TEXT NOT NULL,
    sample_index INTEGER NOT NULL,
    scorer       TEXT NOT NULL,
    usage        TEXT NOT NULL,
    PRIMARY KEY (run_id, problem_id, sample_index, scorer)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS decisions (
    run_id       TEXT NOT NULL,
    problem_id   TEXT NOT NULL,
    decision     TEXT NOT NULL,
    PRIMARY KEY (run_id, problem_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage (
    run_id       TEXT NOT NULL,
    problem_id   TEXT NOT NULL,
    role         TEXT NOT NULL,
    usage        TEXT NOT NULL,
    PRIMARY KEY (run_id, problem_id, role)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS token_stats (
    run_id       TEXT NOT NULL,
    problem_id   TEXT NOT NULL,
    sample_index INTEGER NOT NULL,
    stats        BLOB NOT NULL,
    PRIMARY KEY (run_id, problem_id, sample_index)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS labelers (
    run_id       TEXT NOT NULL,
    labeler      TEXT NOT NULL,
    info         TEXT NOT NULL,
    PRIMARY KEY (run_id, labeler)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS step_labels (
    run_id       TEXT NOT NULL,
    problem_id   TEXT NOT NULL,
    sample_index INTEGER NOT NULL,
    labeler      TEXT NOT NULL,
    step         INTEGER NOT NULL,
    rollouts     INTEGER NOT NULL,
    passed       INTEGER NOT NULL,
    PRIMARY KEY (run_id, problem_id, sample_index, labeler, step)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS label_usage (
    run_id       TEXT NOT NULL,
    problem_id   TEXT NOT NULL,
    sample_index INTEGER NOT NULL,
    labeler      TEXT NOT NULL,
    usage        TEXT NOT NULL,
    PRIMARY KEY (run_id, problem_id, sample_index, labeler)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS claims (
    run_id       TEXT NOT NULL,
    problem_id   TEXT NOT NULL,
    owner        TEXT NOT NULL,
    expires      REAL NOT NULL,
    PRIMARY KEY (run_id, problem_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gradings (
    run_id       TEXT NOT NULL,
    verifier     TEXT NOT NULL,
    info         TEXT NOT NULL,
    updated      REAL NOT NULL,
    PRIMARY KEY (run_id, verifier)
) WITHOUT ROWID;
"""


CLAIM_LEASE_S = 300.0
"""How long a claim on a problem lasts without renewal: longer than any wait between
two stored samples, so a live sampler never loses its claims."""


def claim_owner() -> str:
    """This process as a claims owner: host, process id and a random tag (a reused
    process id is not the same owner)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _owner_alive(owner: str) -> bool:
    """Whether a claim's owner may still run: False only for a process of this machine
    that is gone. Other machines' owners are trusted until their lease runs out."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _problem_meta(meta: dict | None, legacy: bool) -> dict:
    """A problem's meta as stored. A run whose problems were stored before tasks chose
    their answer-extraction rules keeps grading by all of them (`verifiers.math_answer`),
    its new problems too: a run never mixes two gradings."""
    meta = dict(meta or {})
    if legacy:
        meta.pop("answer_rules", None)
    return meta


@dataclass(frozen=True)
class SampleRow:
    """One generated sample, as stored."""

    run_id: str
    problem_id: str
    sample_index: int
    seed: int
    text: str
    prompt_tokens: int
    cached_tokens: int | None
    """Prompt tokens served from a shared KV cache instead of being computed; None when
    the engine could not tell (a server that does not report it)."""
    completion_tokens: int
    finish_reason: str
    latency_s: float | None = None
    reasoning: str | None = None
    """Text a server's reasoning parser split off (the answer is graded from `text`)."""
    token_stats: bytes | None = None
    """Per-token confidence statistics (`confidence.pack`), stored beside the sample in
    the same transaction (table `token_stats`); not read back with the sample."""


@dataclass(frozen=True)
class VerdictRow:
    run_id: str
    problem_id: str
    sample_index: int
    verifier: str
    verdict: str
    reason: str = ""
    extracted: str | None = None


@dataclass(frozen=True)
class ProblemCounts:
    """Per-problem tallies for one run and verifier, aligned arrays in problem order."""

    problem_ids: list[str]
    n: np.ndarray
    c: np.ndarray
    difficulty: np.ndarray
    infra_errors: int


def _sample_row(r: sqlite3.Row) -> SampleRow:
    return SampleRow(r["run_id"], r["problem_id"], r["sample_index"], r["seed"], r["text"], r["prompt_tokens"],
                     r["cached_tokens"], r["completion_tokens"], r["finish_reason"], r["latency_s"], r["reasoning"])


def resolve_workspace(workspace: str | os.PathLike | None = None) -> Path:
    """The workspace folder: the argument, else $TESTTIME_WORKSPACE, else ./testtime-runs."""
    return Path(workspace or os.environ.get(ENV_WORKSPACE) or DEFAULT_WORKSPACE)


def _rollback(cur: sqlite3.Cursor) -> None:
    """Roll back after a failure, keeping the failure: when SQLite has already rolled
    back itself (a full disk), ROLLBACK raises "cannot rollback", which would hide the
    real cause."""
    try:
        cur.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def _open_error(path: Path, e: sqlite3.DatabaseError) -> Exception:
    """What to tell a user whose workspace database cannot be opened."""
    msg = str(e)
    if "not a database" in msg or "malformed" in msg:
        return InputError(f"{path} is corrupt ({msg}). Keep a copy, then recover what can be read with "
                          f"`sqlite3 {path} .recover | sqlite3 recovered.db` and use recovered.db's folder as -w")
    if "readonly" in msg or "unable to open" in msg:
        return InputError(f"cannot write the workspace database {path} ({msg}); is the folder writable? "
                          "Copy the workspace somewhere writable to read it")
    if "disk" in msg and "full" in msg or "SQLITE_FULL" in msg:
        return InfrastructureError(f"the disk holding {path} is full ({msg}); free space and run again")
    return InfrastructureError(f"cannot open the workspace database {path}: {msg}")


class Store:
    """Access to one workspace's database. Cheap to open; one per process or thread."""

    def __init__(self, workspace: str | os.PathLike | None = None, create: bool = True):
        """create=False (commands that only read): a workspace that does not exist is an
        error, so a mistyped -w never silently answers from a new, empty workspace."""
        self.workspace = resolve_workspace(workspace)
        self.path = self.workspace / DB_NAME
        if self.workspace.exists() and not self.workspace.is_dir():
            raise InputError(f"workspace {self.workspace} is a file, not a folder; choose another -w")
        if not create and not self.path.is_file():
            raise NotFoundError(f"no testtime workspace at {self.workspace} (no {DB_NAME} there); check -w or "
                                f"${ENV_WORKSPACE}")
        if not create and not os.access(self.workspace, os.W_OK):
            # a read-only workspace (a shared copy, a mounted archive) can still be read
            self.db = sqlite3.connect(f"file:{self.path}?immutable=1", uri=True, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.read_only = True
            return
        self.read_only = False
        try:
            self.workspace.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create workspace {self.workspace}: {e.strerror}") from None
        try:
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed transaction survives a killed process
            # (the WAL is in the OS page cache); only a power cut can lose the last ones.
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise _open_error(self.path, e) from None

    def _migrate(self) -> None:
        """Bring a workspace written by an earlier version up to this schema, in one
        transaction (a crash leaves the old table whole). Version 1 had no `reasoning`
        column and no room for an unknown cached-token count (NULL)."""
        v1 = "SELECT count(*) = 0 FROM pragma_table_info('samples') WHERE name = 'reasoning'"
        if not self.db.execute(v1).fetchone()[0]:
            return
        cols = ("run_id, problem_id, sample_index, seed, text, prompt_tokens, cached_tokens, completion_tokens, "
                "finish_reason, latency_s, created")
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            if cur.execute(v1).fetchone()[0]:  # another process may have migrated meanwhile
                cur.execute("ALTER TABLE samples RENAME TO samples_v1")
                cur.execute(_SAMPLES_TABLE)
                cur.execute(f"INSERT INTO samples({cols}) SELECT {cols} FROM samples_v1")
                cur.execute("DROP TABLE samples_v1")
            cur.execute("COMMIT")
        except BaseException:
            _rollback(cur)
            raise

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _tx(self, sql: str, rows: Iterable[tuple]) -> int:
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.executemany(sql, rows)
            count = cur.rowcount
            cur.execute("COMMIT")
        except BaseException:
            _rollback(cur)
            raise
        return count

    # -- runs and problems -------------------------------------------------

    def register_run(self, spec: RunSpec, n: int, problems: list, label: str | None = None) -> str:
        """Record a run (or extend one) and the problems it covers. Returns the run id."""
        run_id = spec.run_id
        spec_json = json.dumps(spec.to_dict(), sort_keys=True)
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.execute(
                "INSERT INTO runs(run_id, spec, created, n_target, label) VALUES (?,?,?,?,?) "
                "ON CONFLICT(run_id) DO UPDATE SET n_target = max(n_target, excluded.n_target), "
                "label = coalesce(excluded.label, label)",
                (run_id, spec_json, time.time(), n, label),
            )
            first = cur.execute("SELECT meta FROM problems WHERE run_id = ? ORDER BY position LIMIT 1",
                                (run_id,)).fetchone()
            stored = json.loads(first["meta"] or "{}").get("answer_rules", "legacy") if first else None
            legacy = stored == "legacy"
            asked = {tuple(p.meta["answer_rules"]) for p in problems if (p.meta or {}).get("answer_rules")}
            if stored and not legacy and asked - {tuple(stored)}:
                raise InputError(f"run {run_id} reads answers by the rules {','.join(stored)}, fixed when its problems "
                                 f"were stored; this call asks for {','.join(sorted(asked - {tuple(stored)})[0])}. "
                                 "Its report shows coverage without the last-number rule; for other rules, start "
                                 "a run of its own (another --seed)")
            cur.executemany(
                "INSERT INTO problems(run_id, problem_id, position, question, answer, difficulty, meta) "
                "VALUES (?,?,?,?,?,?,?) ON CONFLICT(run_id, problem_id) DO NOTHING",
                [(run_id, p.id, i, p.question, p.answer, p.difficulty, json.dumps(_problem_meta(p.meta, legacy)))
                 for i, p in enumerate(problems)],
            )
            cur.execute("COMMIT")
        except BaseException:
            _rollback(cur)
            raise
        return run_id

    def run_spec(self, run_id: str) -> RunSpec:
        row = self.db.execute("SELECT spec FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no run {run_id!r} in {self.path}")
        return RunSpec.from_dict(json.loads(row["spec"]))

    def resolve_run(self, prefix: str) -> str:
        """A run id from a unique prefix of it, or a label."""
        rows = self.db.execute(
            # a prefix by comparison, not LIKE: '%' and '_' in what the user typed are characters
            "SELECT run_id FROM runs WHERE substr(run_id, 1, ?) = ? OR label = ?", (len(prefix), prefix, prefix)
        ).fetchall()
        ids = sorted({r["run_id"] for r in rows})
        if not ids:
            known = [r["run_id"] for r in self.db.execute("SELECT run_id FROM runs ORDER BY created")]
            raise NotFoundError(f"no run matches {prefix!r} in {self.path}; runs: {', '.join(known) or '(none)'}")
        if len(ids) > 1:
            raise NotFoundError(f"{prefix!r} matches several runs: {', '.join(ids)}")
        return ids[0]

    def run_or_latest(self, run_id: str | None) -> str:
        """A run id from a prefix or label; with None, the latest run that holds a sample."""
        rid = self.resolve_run(run_id) if run_id else self.latest_run()
        if rid is None:
            raise NotFoundError(f"no run with samples in {self.path}")
        return rid

    def latest_run(self) -> str | None:
        """The run created last that holds a sample (a run whose sampling failed before
        its first sample is not what `report` or `cost` without a run id means)."""
        row = self.db.execute("SELECT run_id FROM runs r WHERE EXISTS (SELECT 1 FROM samples s WHERE "
                              "s.run_id = r.run_id) ORDER BY created DESC LIMIT 1").fetchone()
        return row["run_id"] if row else None

    def problems(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT * FROM problems WHERE run_id = ? ORDER BY position", (run_id,)).fetchall()
        return [dict(r) | {"meta": json.loads(r["meta"] or "{}")} for r in rows]

    def runs(self) -> list[dict[str, Any]]:
        """One summary per run: spec, problems, samples, target n, verdict counts."""
        out = []
        for r in self.db.execute("SELECT * FROM runs ORDER BY created"):
            run_id = r["run_id"]
            n_problems = self.db.execute(
                "SELECT count(*) FROM problems WHERE run_id = ?", (run_id,)).fetchone()[0]
            n_samples, tokens = self.db.execute(
                "SELECT count(*), coalesce(sum(completion_tokens), 0) FROM samples WHERE run_id = ?",
                (run_id,)).fetchone()
            min_per_problem = self.db.execute(
                "SELECT min(cnt) FROM (SELECT p.problem_id, count(s.sample_index) AS cnt FROM problems p "
                "LEFT JOIN samples s ON s.run_id = p.run_id AND s.problem_id = p.problem_id "
                "WHERE p.run_id = ? GROUP BY p.problem_id)", (run_id,)).fetchone()[0] or 0
            finished = self.db.execute("SELECT count(*) FROM usage WHERE run_id = ? AND role = 'policy'",
                                       (run_id,)).fetchone()[0]
            # a strategy run is complete when every problem's result is stored (its
            # candidates need not number n); a sampling run when every problem has n samples
            complete = finished == n_problems if finished else min_per_problem >= r["n_target"]
            out.append({
                "run_id": run_id, "label": r["label"], "created": r["created"],
                "spec": json.loads(r["spec"]), "n_target": r["n_target"],
                "problems": n_problems, "samples": n_samples, "completion_tokens": tokens,
                "complete": n_problems > 0 and complete,
            })
        return out

    # -- samples -----------------------------------------------------------

    # -- claims: one process samples a problem of a run at a time ------------

    def claim(self, run_id: str, problem_ids: list[str], owner: str, lease_s: float = CLAIM_LEASE_S) -> dict[str, str]:
        """Claim the problems of a run that no live process holds, in one transaction.
        Returns the problems held by others (problem id -> owner), which the caller
        must leave to them. A claim lapses when its lease runs out without renewal
        (`renew`), or at once when its owner is a process of this machine that is
        gone (killed, even by kill -9)."""
        now = time.time()
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            held = {r["problem_id"]: (r["owner"], r["expires"]) for r in cur.execute(
                "SELECT problem_id, owner, expires FROM claims WHERE run_id = ?", (run_id,))}
            others = {pid: o for pid, (o, exp) in held.items()
                      if o != owner and exp > now and _owner_alive(o)}
            cur.executemany("INSERT INTO claims(run_id, problem_id, owner, expires) VALUES (?,?,?,?) "
                            "ON CONFLICT(run_id, problem_id) DO UPDATE SET owner = excluded.owner, "
                            "expires = excluded.expires",
                            [(run_id, pid, owner, now + lease_s) for pid in problem_ids if pid not in others])
            cur.execute("COMMIT")
        except BaseException:
            _rollback(cur)
            raise
        return {pid: others[pid] for pid in problem_ids if pid in others}

    def renew(self, run_id: str, owner: str, lease_s: float = CLAIM_LEASE_S) -> None:
        """Extend this owner's claims on a run (a sampler calls it as it stores)."""
        self._tx("UPDATE claims SET expires = ? WHERE run_id = ? AND owner = ?", [(time.time() + lease_s, run_id, owner)])

    def release(self, run_id: str, owner: str, problem_ids: Iterable[str] | None = None) -> None:
        """Give up this owner's claims on a run (all of them, or the given problems')."""
        if problem_ids is None:
            self._tx("DELETE FROM claims WHERE run_id = ? AND owner = ?", [(run_id, owner)])
        else:
            self._tx("DELETE FROM claims WHERE run_id = ? AND owner = ? AND problem_id = ?",
                     [(run_id, owner, pid) for pid in problem_ids])

    def missing(self, run_id: str, problem_ids: list[str], n: int) -> dict[str, list[int]]:
        """For each problem, the sample indices below n that are not stored yet."""
        have: dict[str, set[int]] = {p: set() for p in problem_ids}
        for r in self.db.execute(
                "SELECT problem_id, sample_index FROM samples WHERE run_id = ? AND sample_index < ?",
                (run_id, n)):
            if r[0] in have:
                have[r[0]].add(r[1])
        return {p: [i for i in range(n) if i not in s] for p, s in have.items()}

    def add_samples(self, rows: list[SampleRow]) -> int:
        """Insert samples (and their token statistics) in one transaction; rows that
        exist already are left untouched."""
        now = time.time()
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            # only an existing key is skipped; a malformed row (NULL text...) still fails loudly
            cur.executemany(
                "INSERT INTO samples(run_id, problem_id, sample_index, seed, text, prompt_tokens, "
                "cached_tokens, completion_tokens, finish_reason, latency_s, created, reasoning) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(run_id, problem_id, sample_index) DO NOTHING",
                [(r.run_id, r.problem_id, r.sample_index, r.seed, r.text, r.prompt_tokens, r.cached_tokens,
                  r.completion_tokens, r.finish_reason, r.latency_s, now, r.reasoning) for r in rows])
            count = cur.rowcount
            cur.executemany(
                "INSERT INTO token_stats(run_id, problem_id, sample_index, stats) VALUES (?,?,?,?) "
                "ON CONFLICT(run_id, problem_id, sample_index) DO NOTHING",
                [(r.run_id, r.problem_id, r.sample_index, r.token_stats) for r in rows if r.token_stats is not None])
            cur.execute("COMMIT")
        except BaseException:
            _rollback(cur)
            raise
        return count

    def token_stats(self, run_id: str) -> dict[tuple[str, int], np.ndarray]:
        """Per sample of a run, its per-token confidence statistics (`confidence.FIELDS`),
        where its engine recorded them."""
        from .confidence import unpack

        if not self._has_table("token_stats"):  # a read-only workspace of an older version
            return {}
        return {(r[0], r[1]): unpack(r[2]) for r in self.db.execute(
            "SELECT problem_id, sample_index, stats FROM token_stats WHERE run_id = ?", (run_id,))}

    def samples(self, run_id: str, n: int | None = None) -> list[SampleRow]:
        sql = "SELECT * FROM samples WHERE run_id = ?"
        args: tuple = (run_id,)
        if n is not None:
            sql += " AND sample_index < ?"
            args = (run_id, n)
        rows = self.db.execute(sql + " ORDER BY problem_id, sample_index", args).fetchall()
        return [_sample_row(r) for r in rows]

    # -- strategy results: candidates, step scores and usage, one problem at a time

    def add_result(self, run_id: str, problem_id: str, samples: list[SampleRow],
                   scores: dict[int, list[float]], scorer: str, usage: dict[str, dict[str, float]],
                   decision: dict[str, Any] | None = None) -> None:
        """Store one problem's final candidates, their step scores, what they cost and
        what the strategy decided for it (`decision`: e.g. a policy's difficulty bin and
        choice), in one transaction: a problem is either wholly stored or not at all, so
        a search killed at any moment resumes at the problems it had not finished."""
        now = time.time()
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            if cur.execute("SELECT 1 FROM usage WHERE run_id = ? AND problem_id = ? AND role = 'policy'",
                           (run_id, problem_id)).fetchone():
                cur.execute("COMMIT")  # stored by an earlier attempt; never overwritten
                return
            cur.executemany(
                "INSERT INTO samples(run_id, problem_id, sample_index, seed, text, prompt_tokens, cached_tokens, "
                "completion_tokens, finish_reason, latency_s, created, reasoning) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [(r.run_id, r.problem_id, r.sample_index, r.seed, r.text, r.prompt_tokens, r.cached_tokens,
                  r.completion_tokens, r.finish_reason, r.latency_s, now, r.reasoning) for r in samples])
            cur.executemany(
                "INSERT INTO step_scores(run_id, problem_id, sample_index, scorer, step, score) VALUES (?,?,?,?,?,?)",
                [(run_id, problem_id, i, scorer, k, float(v)) for i, vals in scores.items() for k, v in enumerate(vals)])
            cur.executemany("INSERT INTO usage(run_id, problem_id, role, usage) VALUES (?,?,?,?)",
                            [(run_id, problem_id, role, json.dumps(u)) for role, u in usage.items()])
            if decision:
                cur.execute("INSERT INTO decisions VALUES (?,?,?)", (run_id, problem_id, json.dumps(decision)))
            cur.execute("COMMIT")
        except BaseException:
            _rollback(cur)
            raise

    def _has_table(self, name: str) -> bool:
        """False only for a read-only workspace from before the table existed (it is never migrated)."""
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() \
            is not None

    def decisions(self, run_id: str) -> dict[str, dict[str, Any]]:
        """What a strategy decided per problem (only strategies that record one)."""
        if not self._has_table("decisions"):
            return {}
        return {r[0]: json.loads(r[1]) for r in self.db.execute(
            "SELECT problem_id, decision FROM decisions WHERE run_id = ?", (run_id,))}

    def finished_problems(self, run_id: str) -> set[str]:
        """Problems of a strategy run whose results are stored."""
        return {r[0] for r in self.db.execute(
            "SELECT problem_id FROM usage WHERE run_id = ? AND role = 'policy'", (run_id,))}

    def add_step_scores(self, run_id: str, scorer: str, rows: list[tuple[str, int, list[float]]],
                        usage: list[dict[str, float]] | None = None) -> int:
        """Scores of stored samples' steps, (problem id, sample index, scores), and what
        scoring each sample cost the reward model (`usage`, one dict per row), in one
        transaction; a sample already scored by this scorer is left as it is."""
        flat = [(run_id, pid, i, scorer, k, float(v)) for pid, i, vals in rows for k, v in enumerate(vals)]
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.executemany("INSERT INTO step_scores(run_id, problem_id, sample_index, scorer, step, score) "
                            "VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING", flat)
            count = cur.rowcount
            if usage is not None:
                cur.executemany("INSERT INTO score_usage VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
                                [(run_id, pid, i, scorer, json.dumps(u)) for (pid, i, _), u in zip(rows, usage)])
            cur.execute("COMMIT")
        except BaseException:
            _rollback(cur)
            raise
        return count

    def score_usage(self, run_id: str, n: int | None = None, scorer: str | None = None) -> dict[str, dict[str, float]]:
        """Per problem, what reward models spent scoring a sampling run's samples (the
        first n if given), summed over samples and over scorers (or of one `scorer`)."""
        where = ("AND sample_index < ? " if n is not None else "") + ("AND scorer = ?" if scorer is not None else "")
        args = (run_id,) + ((n,) if n is not None else ()) + ((scorer,) if scorer is not None else ())
        out: dict[str, dict[str, float]] = {}
        if not self._has_table("score_usage"):
            return out
        for pid, u in self.db.execute("SELECT problem_id, usage FROM score_usage WHERE run_id = ? " + where, args):
            acc = out.setdefault(pid, {})
            for k, v in json.loads(u).items():
                acc[k] = acc.get(k, 0) + v
        return out

    def step_scores(self, run_id: str, scorer: str) -> dict[tuple[str, int], list[float]]:
        out: dict[tuple[str, int], list[float]] = {}
        for r in self.db.execute("SELECT problem_id, sample_index, score FROM step_scores WHERE run_id = ? AND "
                                 "scorer = ? ORDER BY problem_id, sample_index, step", (run_id, scorer)):
            out.setdefault((r[0], r[1]), []).append(r[2])
        return out

    def scorers(self, run_id: str) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT DISTINCT scorer FROM step_scores WHERE run_id = ? ORDER BY scorer", (run_id,))]

    def role_usage(self, run_id: str) -> dict[str, dict[str, dict[str, float]]]:
        """Recorded usage per problem and role (strategy runs): {problem: {role: usage}}."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for r in self.db.execute("SELECT problem_id, role, usage FROM usage WHERE run_id = ?", (run_id,)):
            out.setdefault(r[0], {})[r[1]] = json.loads(r[2])
        return out

    # -- verdicts ----------------------------------------------------------

    # -- Monte Carlo step labels (testtime.labels) ---------------------------

    def set_labeler(self, run_id: str, labeler: str, info: dict[str, Any]) -> None:
        self._tx("INSERT INTO labelers VALUES (?,?,?) ON CONFLICT DO NOTHING", [(run_id, labeler, json.dumps(info))])

    def labelers(self, run_id: str) -> dict[str, dict[str, Any]]:
        return {r[0]: json.loads(r[1]) for r in self.db.execute(
            "SELECT labeler, info FROM labelers WHERE run_id = ? ORDER BY labeler", (run_id,))}

    def add_step_labels(self, run_id: str, labeler: str, problem_id: str, sample_index: int,
                        labels: list[tuple[int, int]], usage: dict[str, float]) -> None:
        """One sample's labels, (rollouts, passed) per step, and what they cost, in one
        transaction: a labelling killed at any moment leaves each sample whole or absent."""
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.executemany("INSERT INTO step_labels VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                            [(run_id, problem_id, sample_index, labeler, k, r, p) for k, (r, p) in enumerate(labels)])
            cur.execute("INSERT INTO label_usage VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
                        (run_id, problem_id, sample_index, labeler, json.dumps(usage)))
            cur.execute("COMMIT")
        except BaseException:
            _rollback(cur)
            raise

    def step_labels(self, run_id: str, labeler: str) -> dict[tuple[str, int], list[tuple[int, int]]]:
        """(problem id, sample index) -> [(rollouts, passed) per step]."""
        out: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for r in self.db.execute("SELECT problem_id, sample_index, rollouts, passed FROM step_labels WHERE run_id = ? "
                                 "AND labeler = ? ORDER BY problem_id, sample_index, step", (run_id, labeler)):
            out.setdefault((r[0], r[1]), []).append((r[2], r[3]))
        return out

    def label_usage(self, run_id: str, labeler: str) -> dict[str, float]:
        """What labelling cost, summed over the run's labelled samples."""
        acc: dict[str, float] = {}
        for (u,) in self.db.execute("SELECT usage FROM label_usage WHERE run_id = ? AND labeler = ?", (run_id, labeler)):
            for k, v in json.loads(u).items():
                acc[k] = acc.get(k, 0) + v
        return acc

    def unverified(self, run_id: str, verifier: str) -> list[SampleRow]:
        rows = self.db.execute(
            "SELECT s.* FROM samples s LEFT JOIN verdicts v ON v.run_id = s.run_id AND "
            "v.problem_id = s.problem_id AND v.sample_index = s.sample_index AND v.verifier = ? "
            "WHERE s.run_id = ? AND v.verdict IS NULL ORDER BY s.problem_id, s.sample_index",
            (verifier, run_id)).fetchall()
        return [_sample_row(r) for r in rows]

    def add_verdicts(self, rows: list[VerdictRow]) -> int:
        now = time.time()
        return self._tx(
            "INSERT OR REPLACE INTO verdicts(run_id, problem_id, sample_index, verifier, verdict, reason, "
            "extracted, created) VALUES (?,?,?,?,?,?,?,?)",
            [(r.run_id, r.problem_id, r.sample_index, r.verifier, r.verdict, r.reason, r.extracted, now)
             for r in rows],
        )

    def set_grading_info(self, run_id: str, verifier: str, info: dict[str, Any]) -> None:
        """How a verifier graded this run (for code: the sandbox's isolation and the
        canaries), kept for the report; the latest grading pass wins."""
        self._tx("INSERT OR REPLACE INTO gradings(run_id, verifier, info, updated) VALUES (?,?,?,?)",
                 [(run_id, verifier, json.dumps(info, default=str), time.time())])

    def grading_info(self, run_id: str, verifier: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT info FROM gradings WHERE run_id = ? AND verifier = ?",
                              (run_id, verifier)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_model_shape(self, run_id: str, shape: dict[str, Any], role: str = "policy") -> None:
        """The shape (for FLOPs) of the model that generated a run's samples."""
        self._tx("INSERT OR REPLACE INTO run_models VALUES (?,?,?)", [(run_id, role, json.dumps(shape))])

    def model_shape(self, run_id: str, role: str = "policy") -> dict[str, Any] | None:
        row = self.db.execute("SELECT shape FROM run_models WHERE run_id = ? AND role = ?", (run_id, role)).fetchone()
        return None if row is None else json.loads(row[0])

    def usage(self, run_id: str, n: int | None = None, role: str = "policy") -> dict[str, dict[str, int]]:
        """Per problem, the `flops.Usage` fields of a role: as a strategy run recorded them,
        or for a sampling run summed over its samples (the first n if given)."""
        recorded = self.role_usage(run_id)
        if recorded:
            return {pid: roles[role] for pid, roles in recorded.items() if role in roles}
        if role == "prm":
            return self.score_usage(run_id, n)
        if role != "policy":
            return {}
        limit = "AND sample_index < ?" if n is not None else ""
        rows = self.db.execute(
            "SELECT problem_id, count(*) AS sequences, "
            # an unknown cached count (NULL) is counted as computed, and counted apart
            "  sum(prompt_tokens - coalesce(cached_tokens, 0)) AS prefill, "
            "  sum(prompt_tokens * (prompt_tokens + 1) / 2 "
            "      - coalesce(cached_tokens, 0) * (coalesce(cached_tokens, 0) + 1) / 2) AS prefill_ctx, "
            "  sum(cached_tokens IS NULL) AS cache_unknown, "
            "  sum(prompt_tokens) AS prompt, sum(prompt_tokens * (prompt_tokens + 1) / 2) AS prompt_ctx, "
            "  sum(completion_tokens) AS decode, "
            "  sum((prompt_tokens + completion_tokens) * (prompt_tokens + completion_tokens + 1) / 2 "
            "      - prompt_tokens * (prompt_tokens + 1) / 2) AS decode_ctx "
            "FROM samples WHERE run_id = ? " + limit + " GROUP BY problem_id",
            (run_id,) + ((n,) if n is not None else ())).fetchall()
        return {r["problem_id"]: {k: int(r[k]) for k in r.keys() if k != "problem_id"} for r in rows}

    def verifiers(self, run_id: str) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT DISTINCT verifier FROM verdicts WHERE run_id = ? ORDER BY verifier", (run_id,))]

    def counts(self, run_id: str, verifier: str, n: int | None = None) -> ProblemCounts:
        """Per-problem sample and pass counts, over the first n sample indices if given.

        Samples whose verdict is `infra_error` (a broken harness, not a wrong
        answer) are left out of both n and c, and counted apart.
        """
        limit = "AND s.sample_index < ?" if n is not None else ""
        rows = self.db.execute(
            "SELECT p.problem_id, p.difficulty, "
            "  count(s.sample_index) - sum(coalesce(v.verdict = 'infra_error', 0)) AS n, "
            "  sum(coalesce(v.verdict = 'pass', 0)) AS c, "
            "  sum(coalesce(v.verdict = 'infra_error', 0)) AS infra "
            "FROM problems p "
            "LEFT JOIN samples s ON s.run_id = p.run_id AND s.problem_id = p.problem_id " + limit + " "
            "LEFT JOIN verdicts v ON v.run_id = s.run_id AND v.problem_id = s.problem_id "
            "  AND v.sample_index = s.sample_index AND v.verifier = ? "
            "WHERE p.run_id = ? GROUP BY p.problem_id ORDER BY p.position",
            # the limit's placeholder comes before the verifier's in the SQL text
            ((n,) if n is not None else ()) + (verifier, run_id),
        ).fetchall()
        return ProblemCounts(
            problem_ids=[r["problem_id"] for r in rows],
            n=np.array([r["n"] for r in rows], dtype=np.int64),
            c=np.array([r["c"] or 0 for r in rows], dtype=np.int64),
            difficulty=np.array([r["difficulty"] if r["difficulty"] is not None else -1 for r in rows]),
            infra_errors=int(sum(r["infra"] or 0 for r in rows)),
        )

    # -- export ------------------------------------------------------------

    def iter_export(self, run_id: str) -> Iterator[dict[str, Any]]:
        """Samples joined with their problem and every verdict, one dict per sample."""
        verdicts: dict[tuple[str, int], dict[str, Any]] = {}
        for v in self.db.execute("SELECT * FROM verdicts WHERE run_id = ?", (run_id,)):
            verdicts.setdefault((v["problem_id"], v["sample_index"]), {})[v["verifier"]] = {
                "verdict": v["verdict"], "reason": v["reason"], "extracted": v["extracted"]}
        problems = {p["problem_id"]: p for p in self.problems(run_id)}
        from .flops import ModelShape, Usage  # per-sample FLOPs when the run recorded its model's shape

        shape_d = self.model_shape(run_id)
        shape = ModelShape.from_dict(shape_d) if shape_d else None
        for s in self.samples(run_id):
            p = problems.get(s.problem_id, {})
            u = Usage.of(s.prompt_tokens, s.cached_tokens, s.completion_tokens) if shape else None
            yield {
                "run_id": run_id, "problem_id": s.problem_id, "sample_index": s.sample_index,
                "seed": s.seed, "question": p.get("question"), "reference": p.get("answer"),
                "difficulty": p.get("difficulty"), "text": s.text, "prompt_tokens": s.prompt_tokens,
                "cached_tokens": s.cached_tokens, "completion_tokens": s.completion_tokens,
                "finish_reason": s.finish_reason, "latency_s": s.latency_s, "reasoning": s.reasoning,
                "flops": shape.flops(u) if shape else None,
                "flops_unshared": shape.flops(u, shared=False) if shape else None,
                "verdicts": verdicts.get((s.problem_id, s.sample_index), {}),
            }

    def check_writable_target(self, path: str | os.PathLike, force: bool = False) -> None:
        """Refuse to write an output file over this store's database or its journals (ever),
        over a directory, or over any existing file unless `force`."""
        target = Path(path).resolve()
        db = self.path.resolve()
        if target in {db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"),
                      db.with_name(db.name + "-journal")}:
            raise InputError(f"{path} is this workspace's database: writing there would destroy every stored run; "
                             "choose another file")
        if target.is_dir():
            raise InputError(f"{path} is a directory; give a file name (e.g. {Path(path) / 'samples.jsonl'})")
        if target.exists() and not force:
            raise InputError(f"{path} exists; pass --force to replace it")
        if target.exists() and target.is_file():
            with open(target, "rb") as f:  # another workspace's database is still a database
                if f.read(16) == b"SQLite format 3\x00":
                    raise InputError(f"{path} is a SQLite database (a testtime workspace?); choose another file")

    def export(self, run_id: str, path: str | os.PathLike, fmt: str | None = None) -> Path:
        """Write a run's samples to JSONL or Parquet (chosen by `fmt` or the file suffix).

        The file is written to a temporary name and renamed, so an interrupted
        export never leaves a half-written file under the requested name.
        """
        path = Path(path)
        fmt = fmt or path.suffix.lstrip(".")
        if fmt not in ("jsonl", "parquet"):
            raise InputError(f"export format must be jsonl, parquet, sft, dpo, prm, orm or tpo, got {fmt!r}")
        rows = self.iter_export(run_id)
        with atomic_path(path) as tmp:
            if fmt == "jsonl":
                with open(tmp, "w") as f:
                    for r in rows:
                        f.write(json.dumps(r) + "\n")
            else:
                import pyarrow as pa
                import pyarrow.parquet as pq
                flat = [dict(r, verdicts=json.dumps(r["verdicts"])) for r in rows]
                pq.write_table(pa.Table.from_pylist(flat), tmp)
        return path
