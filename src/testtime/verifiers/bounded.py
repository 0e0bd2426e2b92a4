"""Bounded calls for code that bounds itself with SIGALRM (math-verify, SymPy).

Signals reach only the main thread. Off it (the serve worker, a grading thread)
math-verify's timeouts raise `ValueError: signal only works in main thread`
instead of bounding anything, so `\\boxed{\\pi/2}` against `\\frac{\\pi}{2}` failed
as "could not be compared", and `\\sqrt{2}`, `2^{1/2}` and `\\sqrt 2` got three
different vote keys. `bounded` runs such a call directly in the main thread, and
from any other thread in a worker process, where it runs in that process's main
thread with its own timeouts, under a hard deadline: a call that overruns is
killed with its worker, and the next call starts a fresh one.

The worker is started with `spawn` (never `fork`: the caller may hold llama.cpp
threads and locks), once per process, on the first call off the main thread.
"""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any, Callable

_LOCK = threading.Lock()
_POOL: Any = None


def _pool() -> Any:
    global _POOL
    with _LOCK:
        if _POOL is None:
            _POOL = multiprocessing.get_context("spawn").Pool(1)
        return _POOL


def _discard(pool: Any) -> None:
    """Kill a pool whose worker overran (only if no other thread replaced it already)."""
    global _POOL
    with _LOCK:
        if _POOL is pool:
            _POOL = None
    pool.terminate()


def bounded(fn: Callable[..., Any], *args: Any, deadline: float = 30.0) -> Any:
    """fn(*args), bounded in any thread: in the main thread as is (fn's own signal
    timeouts work there), elsewhere in the worker process with `deadline` seconds at
    most (TimeoutError past it). fn and its arguments must be picklable."""
    if threading.current_thread() is threading.main_thread():
        return fn(*args)
    pool = _pool()
    result = pool.apply_async(fn, args)
    try:
        return result.get(timeout=deadline)
    except multiprocessing.TimeoutError:
        _discard(pool)
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} took more than {deadline} s") from None
