"""A local tritonserver over a model repository (triton_repo.py): for trying a repository out, the
tests and the benchmark."""

from __future__ import annotations

import os
import shutil
import site
import socket
import subprocess
import sys
import time
from pathlib import Path

from diffrt.errors import DiffrtError


def find_tritonserver() -> Path | None:
    """$DIFFRT_TRITONSERVER, else `tritonserver` on PATH, else the build `make tritonserver` puts in
    the venv (nvidia-pytriton's wheel); None when there is none."""
    named = os.environ.get("DIFFRT_TRITONSERVER") or shutil.which("tritonserver")
    if named:
        return Path(named)
    bundled = Path(sys.prefix) / "tritonserver" / "server" / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    return bundled if bundled.is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalTritonServer:
    """tritonserver over a repository, on free loopback ports, its log in a file:

        with LocalTritonServer("model_repository") as server:
            httpx.post(f"{server.url}/v2/models/diffrt/infer", json=...)

    The stub's Python finds diffrt through PYTHONPATH (this interpreter's site-packages; model.py
    adds them), after `numpy_path` (a numpy of the stub's ABI: `make tritonserver` puts numpy<2
    beside its build, taken when `numpy_path` is None; "" adds none)."""

    def __init__(self, repo: str | Path, *, binary: str | Path | None = None, log: str | Path | None = None,
                 numpy_path: str | Path | None = None, env: dict[str, str] | None = None, args: tuple[str, ...] = ()):
        binary = Path(binary) if binary else find_tritonserver()
        if binary is None or not binary.is_file():
            raise DiffrtError("no tritonserver found: set DIFFRT_TRITONSERVER, put it on PATH, or run `make tritonserver`")
        self.binary, self.repo = binary, Path(repo)
        self.log = Path(log) if log else self.repo.parent / "tritonserver.log"
        bundled_numpy = Path(sys.prefix) / "tritonserver" / "numpy1"
        if numpy_path is None and bundled_numpy.is_dir():
            numpy_path = bundled_numpy
        self.pythonpath = ([str(numpy_path)] if numpy_path else []) + site.getsitepackages()
        self.env = env or {}
        self.args = tuple(args)  # more tritonserver options
        self.http, self.grpc, self.metrics = _free_port(), _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics}/metrics"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "LocalTritonServer":
        command = [str(self.binary), "--model-repository", str(self.repo), "--http-address", "127.0.0.1",
                   "--http-port", str(self.http), "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc),
                   "--metrics-port", str(self.metrics), "--allow-gpu-metrics", "false"]
        backends = self.binary.parent.parent / "backends"  # a relocated build (the pytriton wheel's) names its own
        if backends.is_dir():
            command += ["--backend-directory", str(backends)]
        command += self.args
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(self.pythonpath), **self.env}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 600) -> "LocalTritonServer":
        """Block until every model is ready; DiffrtError with the log's tail if the server exits or times out."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DiffrtError(f"tritonserver exited ({self.proc.returncode}); its log ends:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise DiffrtError(f"tritonserver was not ready after {timeout:.0f} s; its log ends:\n{self.tail()}")

    def log_text(self) -> str:
        return self.log.read_bytes().decode("utf-8", "replace")

    def tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def stop(self, timeout: float = 60) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: Triton finishes what is in flight, unloads, exits
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "LocalTritonServer":
        self.start()
        try:
            return self.wait_ready()
        except BaseException:  # not ready: no server left running behind the caller
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
