"""Test helpers shared by the service tests: hold the worker so that requests queue together."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def queued_together(server, client, bodies: list[dict], *, blocker: dict, steps: int) -> list[httpx.Response]:
    """POST every body while the worker is held on a first request (`blocker`, whose batch key none
    of the bodies has), so that all of them wait in the queue at once and the batcher groups them
    as it would under load; JSON answers, in order."""
    batcher = server.runtime.batcher
    original, gate = batcher.run_batch, threading.Event()
    batcher.run_batch = lambda jobs: gate.wait(30) and original(jobs)

    def post(body: dict) -> httpx.Response:
        return client.post("/v1/generate", json={"num_inference_steps": steps, **body}, headers={"Accept": "application/json"})

    try:
        with ThreadPoolExecutor(len(bodies) + 1) as pool:
            held = pool.submit(post, blocker)
            wait_until(lambda: batcher.in_flight == 1 and batcher.depth == 0, "the first request to hold the worker")
            futures = [pool.submit(post, body) for body in bodies]
            wait_until(lambda: batcher.depth == len(bodies), "every request to queue")
            gate.set()
            assert held.result(timeout=60).status_code == 200
            return [future.result(timeout=60) for future in futures]
    finally:
        gate.set()
        batcher.run_batch = original


def post_and_hold(url: str, body: dict, headers: dict | None = None) -> socket.socket:
    """POST `body` to `url` over a socket of its own and return the socket, its answer unread:
    closing it is a client hanging up (a closed tab, a proxy's timeout, a retry) while it waits."""
    where = urlsplit(url)
    data = json.dumps(body).encode()
    lines = [f"POST {where.path} HTTP/1.1", f"Host: {where.netloc}", "Content-Type: application/json",
             f"Content-Length: {len(data)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    sock = socket.create_connection((where.hostname, where.port), timeout=30)
    sock.sendall("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + data)
    return sock


@contextlib.contextmanager
def logged(*names: str, level: int = logging.INFO):
    """The records the named loggers emit at `level` or above, from any thread; uvicorn's loggers do
    not propagate to the root logger, so pytest's caplog does not see them."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler, loggers = Keep(level), [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > level:
            logger.setLevel(level)
    try:
        yield records
    finally:
        for logger, old in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(old)
