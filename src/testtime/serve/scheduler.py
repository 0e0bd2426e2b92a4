"""Continuous batching across requests: one engine, one long generate call, many callers.

The engine runs a single `generate` call on its own thread for as long as the server
lives. Its request stream is fed from every caller at once: each served request runs
its strategy on a thread of its own, against `SharedEngine` (which is an `Engine`), and
every `generate` call those strategies make (samples, steps, the judge's prompts) adds
its requests to one waiting list. The engine takes work from that list whenever it has
room, so a request's samples enter the batch as they arrive and leave as they finish:
a short request never waits for a long one to end.

Which waiting request goes next: one of the served request with the smallest budget
(a plain `sample` before a majority@8, and a best_of_n@4's judge calls before a
majority@8's samples), earliest arrival first among equals, except that a request
waiting longer than `max_wait_s` goes first, oldest first, so nothing starves. The
engine holds at most `capacity` samples (its slots) at a time, and a request with
more samples than there is room for goes in part, so the choice of what runs next
stays here, where it can still be made, rather than in the engine's own queue.

Cancellation: a served request that is cancelled (its client went away) makes every
request its strategy sent report `cancelled()`; the engine stops those running at its
next step, and those still waiting here are answered "cancelled" at once, without
waiting for room.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from ..errors import InputError
from ..engines.base import Completion, Engine, Request, StreamStalled, is_cancelled, never_started


class Ticket:
    """A served request's handle, seen by every engine call its strategy makes on this
    thread (`SharedEngine.serving`)."""

    def __init__(self, size: int = 1, on_completion: Callable[[Completion], None] | None = None):
        self.cancelled = False
        self.size = size
        """Samples the request asked for (its budget N): smaller requests go first."""
        self.arrival = time.monotonic()
        self.on_completion = on_completion
        """Called on the engine's thread with each completion of this request (progress)."""

    def cancel(self) -> None:
        self.cancelled = True


@dataclasses.dataclass(eq=False)
class _Call:
    """One `generate` call of one caller: its completions arrive in `out`."""

    ticket: Ticket | None
    out: "queue.SimpleQueue[Completion | BaseException]" = dataclasses.field(default_factory=queue.SimpleQueue)
    closed: bool = False

    def cancelled(self) -> bool:
        return self.closed or (self.ticket is not None and self.ticket.cancelled)


@dataclasses.dataclass(eq=False)
class _Waiting:
    req: Request
    """The caller's request (or what is left of it), its key wrapped as (call, key,
    offset of its first seed in the caller's request)."""
    call: _Call
    order: int
    since: float


def _priority(w: _Waiting) -> tuple:
    """Smaller served requests first, then the one that arrived first (so a request that
    has started finishes before a later one of its size starts); for engine calls outside
    a served request, their own sample count and order."""
    t = w.call.ticket
    return (t.size, t.arrival, w.order) if t is not None else (w.req.n, w.since, w.order)


def _split(req: Request, k: int) -> tuple[Request, Request]:
    """A waiting request's first k samples, and the rest (keys carry each part's offset in
    the caller's seeds, so completions come back with the caller's indices)."""
    call, key, offset = req.key
    on_token = req.on_token

    def part(seeds: tuple[int, ...], at: int) -> Request:
        shifted = (lambda i, text: on_token(i + at - offset, text)) if on_token is not None else None
        return dataclasses.replace(req, key=(call, key, at), seeds=seeds, on_token=shifted)

    return part(req.seeds[:k], offset), part(req.seeds[k:], offset + k)


class SharedEngine:
    """An `Engine` that many threads may call at once, over one engine that is not
    thread-safe. Attributes it does not define (capabilities, `shape`, `identity`) are
    the engine's own."""

    def __init__(self, engine: Engine, capacity: int | None = None, max_wait_s: float = 120.0):
        self.engine = engine
        slots = int(getattr(engine, "slots", 16) or 16)
        self.capacity = capacity or slots
        self.max_wait_s = max_wait_s
        self._cond = threading.Condition()
        self._waiting: list[_Waiting] = []
        self._order = itertools.count()
        self._closed = False
        self._local = threading.local()
        self.inflight = 0
        """Samples the engine holds (running or queued in it) and has not finished."""
        self.generated = 0
        """Tokens generated since start (every sample, cancelled ones included)."""
        self.completed = 0
        self._recent: deque[tuple[float, int]] = deque()
        self.crashes = 0
        self._inside: dict[_Call, int] = {}
        """Samples of each call the engine holds (engine thread, under the lock)."""
        self._thread = threading.Thread(target=self._loop, name="testtime-engine", daemon=True)
        self._thread.start()

    # -- what callers see ------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name == "engine":  # not set yet (during __init__) or unpickling
            raise AttributeError(name)
        return getattr(self.engine, name)

    @property
    def waiting(self) -> int:
        """Samples waiting here for room in the engine."""
        with self._cond:
            return sum(w.req.n for w in self._waiting)

    def tokens_per_s(self, window_s: float = 10.0) -> float:
        """Generated tokens per second over the last `window_s` seconds."""
        now = time.monotonic()
        with self._cond:
            while self._recent and self._recent[0][0] < now - window_s:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / window_s

    def serving(self, ticket: Ticket) -> "_Serving":
        """`with shared.serving(ticket):` every engine call this thread makes inside belongs
        to ticket's request (cancelled with it, and counted in its progress)."""
        return _Serving(self._local, ticket)

    def generate(self, requests: Iterable[Request | None]) -> Iterator[Completion]:
        """The engine protocol, from any thread: requests join the shared waiting list and
        completions come back as the engine finishes them."""
        call = _Call(getattr(self._local, "ticket", None))
        source = iter(requests)
        pending, exhausted, end = 0, False, object()
        try:
            while True:
                while not exhausted:
                    req = next(source, end)
                    if req is end:
                        exhausted = True
                    elif req is None:
                        break
                    else:
                        self._submit(req, call)
                        pending += req.n
                if not pending:
                    if exhausted:
                        return
                    raise StreamStalled("the request stream waits for results, but no sample is running")
                item = call.out.get()
                if isinstance(item, BaseException):
                    raise item
                pending -= 1
                yield item
        finally:
            if pending:  # closed early: what it still has waiting or running is wasted work
                call.closed = True
                self._drop_waiting(call)

    def close(self, engine: bool = True) -> None:
        """Stop the engine's thread once it has finished what it holds; then close the
        engine too, unless `engine=False` (the caller goes on using it directly)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        if engine:
            self.engine.close()

    # -- the waiting list ------------------------------------------------------

    def _submit(self, req: Request, call: _Call) -> None:
        if self._closed:
            raise RuntimeError("the server's engine is closed")
        own = req.cancelled
        wrapped = dataclasses.replace(req, key=(call, req.key, 0),
                                      cancelled=lambda: call.cancelled() or bool(own and own()))
        with self._cond:
            self._waiting.append(_Waiting(wrapped, call, next(self._order), time.monotonic()))
            self._cond.notify_all()

    def _drop_waiting(self, call: _Call) -> None:
        """A call that is cancelled or closed: its requests still waiting never start."""
        with self._cond:
            mine = [w for w in self._waiting if w.call is call]
            self._waiting = [w for w in self._waiting if w.call is not call]
        for w in mine:
            for i in range(w.req.n):
                self._deliver(never_started(w.req, i))

    def _pick(self) -> _Waiting | None:
        """The next request for the engine (under the lock), or None. A request with more
        samples than the engine has room for goes in part: the rest waits (and competes)."""
        room = self.capacity - self.inflight
        if not self._waiting or room <= 0:
            return None
        now = time.monotonic()
        old = [w for w in self._waiting if now - w.since > self.max_wait_s]
        best = min(old, key=lambda w: w.order) if old else min(self._waiting, key=_priority)
        if best.req.n <= room:
            self._waiting.remove(best)
            return best
        head, best.req = _split(best.req, room)
        return _Waiting(head, best.call, best.order, best.since)

    def _stream(self) -> Iterator[Request | None]:
        """The engine's request stream: blocks only while the engine has nothing at all."""
        check = getattr(self.engine, "check_request", None)
        while True:
            with self._cond:
                while not self._closed and self.inflight == 0 and not self._waiting:
                    self._cond.wait()
                if self._closed and self.inflight == 0:
                    return
                gone = [w for w in self._waiting if w.call.cancelled() or is_cancelled(w.req)]
                self._waiting = [w for w in self._waiting if w not in gone]
                w = self._pick()
            for g in gone:  # cancelled while waiting: answered now, not when room comes
                for i in range(g.req.n):
                    self._deliver(never_started(g.req, i))
            if w is None:
                if self.inflight:  # the engine goes on with what it has, and asks again
                    yield None
                continue  # (with nothing running, "wait" would stall it: wait here instead)
            if w.call.cancelled() or is_cancelled(w.req):
                for i in range(w.req.n):
                    self._deliver(never_started(w.req, i))
                continue
            if check is not None:
                try:
                    check(w.req)
                except InputError as e:  # this request cannot run; the batch goes on
                    w.call.out.put(InputError(str(e).replace(repr(w.req.key), repr(w.req.key[1]))))
                    self._drop_waiting(w.call)  # the rest of a request given in part, too
                    continue
            with self._cond:
                self.inflight += w.req.n
                self._inside[w.call] = self._inside.get(w.call, 0) + w.req.n
            yield w.req

    # -- the engine's thread ---------------------------------------------------

    def _deliver(self, c: Completion) -> None:
        call, key, offset = c.key
        c = dataclasses.replace(c, key=key, index=c.index + offset)
        if call.ticket is not None and call.ticket.on_completion is not None:
            try:
                call.ticket.on_completion(c)
            except Exception:
                pass
        if not call.closed:
            call.out.put(c)

    def _loop(self) -> None:
        while not self._closed:
            try:
                for c in self.engine.generate(self._stream()):
                    with self._cond:
                        self.inflight -= 1
                        call = c.key[0]
                        self._inside[call] -= 1
                        if not self._inside[call]:
                            del self._inside[call]
                        self.completed += 1
                        self.generated += c.completion_tokens
                        self._recent.append((time.monotonic(), c.completion_tokens))
                    self._deliver(c)
            except BaseException as e:  # the engine failed: every caller with work in it hears why
                self.crashes += 1
                self._fail_all(e)
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                time.sleep(0.05)

    def _fail_all(self, error: BaseException) -> None:
        """Every call with work waiting or inside the engine gets the error (the engine's
        generate call is gone, and with it what it held)."""
        with self._cond:
            self.inflight = 0
            waiting, self._waiting = self._waiting, []
            calls = {w.call for w in waiting} | set(self._inside)
            self._inside.clear()
        for call in calls:
            call.out.put(RuntimeError(f"the engine failed: {error}"))


class _Serving:
    def __init__(self, local: threading.local, ticket: Ticket):
        self.local, self.ticket = local, ticket

    def __enter__(self) -> Ticket:
        self.local.ticket = self.ticket
        return self.ticket

    def __exit__(self, *exc: Any) -> None:
        self.local.ticket = None
