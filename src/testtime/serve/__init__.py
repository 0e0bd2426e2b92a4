"""`testtime serve`: an OpenAI-compatible server that spends test-time compute on every
request, and that an application can sit behind.

Clients keep the API they already call and choose a strategy per request, through the
model name or an extra body field. Every registered strategy is servable
(`testtime.strategies`), with its parameters at their defaults or set in the body:

    model "majority@8"      self-consistency: 8 samples, the most common final answer
    model "best_of_n@4"     4 samples scored by the judge; the answer with the highest
                            summed score
    model "beam_search@8"   any registered strategy at budget N (step-wise ones need the judge)
    model "sample"          one sample, as is (streamed token by token with "stream": true)
    model "policy@16"       a compute-optimal policy (`testtime optimal --difficulty predicted`)
                            at budget 16: probe samples scored by the judge give the
                            difficulty bin, and the bin's choice runs
    extra body {"testtime": {"strategy": "beam_search", "n": 8, "params": {"width": 2}}}

Routes: `/v1/chat/completions`, `/v1/completions` (a raw prompt, no chat template),
`/v1/models`, `/health` and `/metrics` (Prometheus). The reply is the candidate that
carries the chosen answer (the earliest of them), whole; `usage` counts every token spent
inside (all samples' prompts and completions, and the judge's), and `testtime` says how
the answer was chosen (votes, candidates; an adaptive strategy's `decision`: where it
stopped). Errors are OpenAI-style bodies (`{"error": {"message", "type", "param", "code"}}`).

How requests share the engine (`scheduler.SharedEngine`), how they stream, cancel and are
limited (`app`): see those modules.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from .app import ServeConfig, choose, make_app
from .requests import BadRequest, Limits
from .scheduler import SharedEngine, Ticket


class RunningServer:
    """uvicorn serving an app on a thread (tests, benchmarks, embedding in a program);
    `testtime serve` runs the same in the foreground."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, max_connections: int = 512,
                 keep_alive_s: int = 5):
        import uvicorn

        self.app = app
        self.sock = bind(host, port)
        self.server = uvicorn.Server(uvicorn_config(app, max_connections, keep_alive_s))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="testtime-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.sock.getsockname()[0]}:{self.port}/v1"

    @property
    def state(self) -> Any:
        return self.app.state.server

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.state.runner.pool.shutdown(wait=False, cancel_futures=True)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app: Any, max_connections: int = 512, keep_alive_s: int = 5) -> Any:
    """uvicorn's settings for testtime: connections beyond max_connections get 503, idle
    keep-alive connections close after keep_alive_s, uvicorn's own access log is off (the
    app writes one JSON line per request on `testtime.serve.access`)."""
    import uvicorn

    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", limit_concurrency=max_connections,
                          timeout_keep_alive=keep_alive_s, h11_max_incomplete_event_size=64 * 1024)


__all__ = ["BadRequest", "Limits", "RunningServer", "ServeConfig", "SharedEngine", "Ticket", "bind", "choose",
           "make_app", "uvicorn_config"]
