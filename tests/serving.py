"""Test helpers shared by the service tests: hold the worker so that requests queue together."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

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
