"""manifest.json: what an artifact folder holds and how it was made.

It is the cache key and the guard against running something stale or foreign: every file is
listed with its sha256; the key hashes the source weights, LoRA files and scales, precision,
shape ranges, opset and library versions (RELIABILITY #1, #2, #11). The manifest is written
last, atomically, so a folder without one is an interrupted export and is never trusted (#10).
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

from diffrt import __version__, atomic
from diffrt.errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT = 1


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def _module_version(module: str) -> str | None:
    """For libraries installed without pip metadata (e.g. TensorRT from NVIDIA's tarball)."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return None
    try:
        return getattr(importlib.import_module(module), "__version__", None)
    except Exception:
        return None


def library_versions() -> dict[str, str | None]:
    import torch

    ort = _version("onnxruntime") or _version("onnxruntime-gpu")
    trt = _version("tensorrt") or _version("tensorrt-cu12") or _version("tensorrt-cu13") or _module_version("tensorrt")
    return {"diffrt": __version__, "torch": torch.__version__, "diffusers": _version("diffusers"),
            "onnx": _version("onnx"), "onnxruntime": ort, "tensorrt": trt, "python": platform.python_version()}


def gpu_identity() -> dict | None:
    """GPU name and compute capability: an engine is only valid on the GPU model it was built for."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"name": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def cache_key(parts: dict[str, Any]) -> str:
    """A content address: equal inputs give an equal key, any changed input a new one."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST}: not an artifact folder, or an export that did not finish; re-run `diffrt export`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-run `diffrt export`") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} has format {manifest.get('format')}, this diffrt reads format {FORMAT}; re-export")
    return manifest


def write_manifest(folder: str | Path, manifest: dict) -> None:
    atomic.write_json(Path(folder) / MANIFEST, {"format": FORMAT, **manifest})


def hash_files(folder: Path, names: list[str]) -> dict[str, str]:
    return {name: atomic.sha256_file(folder / name) for name in names}


def verify_files(folder: str | Path, manifest: dict, components: list[str] | None = None) -> None:
    """Refuse an artifact whose files are missing or differ from what the manifest recorded."""
    folder = Path(folder)
    for name, comp in manifest["components"].items():
        if components is not None and name not in components:
            continue
        for rel, digest in comp["files"].items():
            path = folder / rel
            if not path.is_file():
                raise ArtifactError(f"{path} is missing from the artifact; re-run `diffrt export`")
            if atomic.sha256_file(path) != digest:
                raise ArtifactError(f"{path} does not match its sha256 in {MANIFEST} (edited or corrupt); re-run `diffrt export` to rebuild it")


def check_engine_compatible(engine: dict) -> None:
    """An engine built with another TensorRT or on another GPU model is refused, never run."""
    versions, here = library_versions(), gpu_identity()
    if engine.get("tensorrt") != versions["tensorrt"]:
        raise ArtifactError(f"engine was built with TensorRT {engine.get('tensorrt')}, this machine has {versions['tensorrt']}; rebuild it with `diffrt export --backend tensorrt`")
    if here is None or engine.get("gpu") != here:
        raise ArtifactError(f"engine was built for {engine.get('gpu')}, this machine has {here}; rebuild it with `diffrt export --backend tensorrt`")
