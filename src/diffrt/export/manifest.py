"""manifest.json: what an artifact folder holds and how it was made.

It is the cache key and the guard against running something stale or foreign: every file is
listed with its sha256; the key hashes the source weights, LoRA files and scales, precision,
shape ranges, opset and library versions (RELIABILITY #1, #2, #11). The manifest is written
last, atomically, so a folder without one is an interrupted export and is never trusted (#10).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
from pathlib import Path, PurePosixPath
from typing import Any

from diffrt import __version__, atomic
from diffrt.errors import ArtifactError

log = logging.getLogger(__name__)
_UNDIGESTED: set[Path] = set()  # manifests without a digest already warned about

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
    # The module's own version first: the library that loads, which TensorRT's deserializer compares an engine with
    # (the `tensorrt` meta-package and the tensorrt-cu12 that provides the module may be at other versions).
    trt = _module_version("tensorrt") or _version("tensorrt") or _version("tensorrt-cu12") or _version("tensorrt-cu13")
    return {"diffrt": __version__, "torch": torch.__version__, "diffusers": _version("diffusers"),
            "onnx": _version("onnx"), "onnxruntime": ort, "tensorrt": trt, "python": platform.python_version()}


def gpu_identity(device=None) -> dict | None:
    """GPU name and compute capability of `device` (None: torch's current CUDA device, where engines are built): an
    engine is only valid on the GPU model it was built for, and a machine may hold GPUs of several models."""
    import torch

    if not torch.cuda.is_available():
        return None
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device.index if device.index is not None else torch.cuda.current_device())
    return {"name": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def cache_key(parts: dict[str, Any]) -> str:
    """A content address: equal inputs give an equal key, any changed input a new one."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def artifact_lock(folder: str | Path, *, shared: bool = False):
    """The lock of an artifact folder, `.<name>.lock` beside it: exclusive while an export or a refit writes the
    folder, shared while a pipeline opens it (manifest, hashes, sessions and engines read into memory), so that
    a reader never pairs an old manifest with files a rebuild has just replaced; it waits for the rebuild
    instead. Readers on a read-only mount take none."""
    folder = Path(folder).resolve()  # one lock per folder, however it is named (a `latest` link, ".")
    waiting = f"waiting for the export or refit writing {folder} to finish" if shared else f"waiting for others using {folder}"
    return atomic.file_lock(folder.parent / f".{folder.name}.lock", shared=shared, waiting=waiting)


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():  # a mistyped path is "not found", not a broken artifact
        raise ArtifactError(f"{folder} is not a folder{'' if Path(folder).exists() else ' (not found)'}; give the artifact "
                            "folder `diffrt export --out` wrote")
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST}: not an artifact folder, or an export that did not finish; re-run `diffrt export`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-run `diffrt export`") from None
    if not isinstance(manifest, dict):
        kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(manifest), "null")
        raise ArtifactError(f"{path} holds a JSON {kind}, not a manifest object; re-run `diffrt export`")
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} has format {manifest.get('format')!r}, this diffrt reads format {FORMAT}; re-export")
    # Every file has its sha256 here; this covers the manifest's own content (the scheduler, the VAE's factors, the
    # tokenizer's length): edited, it would run other images silently. Manifests written before it have none.
    if "digest" not in manifest:  # from before the digest, or one an edit removed: its settings go unchecked
        if path not in _UNDIGESTED:  # once per manifest and process (a call reads it more than once)
            _UNDIGESTED.add(path)
            log.warning("%s has no digest (written by an older diffrt, or edited), so its settings (scheduler, VAE factors, "
                        "tokenizer length) are not checked; re-run `diffrt export` to have them checked", path)
    elif manifest["digest"] != _digest(manifest):
        raise ArtifactError(f"{path} was changed after export (its content no longer matches its digest); re-run `diffrt export`")
    check_schema(manifest, path)
    return manifest


def _digest(manifest: dict) -> str:
    """sha256 of the manifest's content, its own digest left out."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# What every reader indexes without a default: a manifest lacking one of these (edited by hand, or
# written by something else) is refused here, by name, rather than failing later as a KeyError, and
# an export finding it rebuilds instead of taking it for a cache hit.
REQUIRED = {"key": str, "kind": str, "source": dict, "loras": list, "components": dict, "pipeline": dict}
COMPONENT_REQUIRED = {"spec": dict, "files": dict}
PIPELINE_REQUIRED = {"pixel": ("scheduler", "info", "channels", "sample_size"),
                     "text-to-image": ("scheduler", "tokenizer", "unet", "vae_scaling_factor", "vae_factor", "default_size",
                                       "max_length")}


def _inside(rel: str, component: str) -> bool:
    """Whether a manifest's file entry is a relative path under `component/`, with no '..' on the way."""
    parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
    return len(parts) >= 2 and parts[0] == component and ".." not in parts and not rel.startswith("/") and "\\" not in rel


def check_schema(manifest: dict, path: Path) -> None:
    """ArtifactError naming the first key that is missing or of the wrong type."""
    def refuse(what: str) -> None:
        raise ArtifactError(f"{path} {what} (edited by hand, or not written by `diffrt export`); re-run `diffrt export`")

    for key, kind in REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            refuse(f"lacks {key!r}" if key not in manifest else f"has a {type(manifest[key]).__name__} for {key!r}, not a {kind.__name__}")
    missing = [key for key in PIPELINE_REQUIRED.get(manifest["kind"], ()) if key not in manifest["pipeline"]]
    if missing:
        refuse(f"lacks pipeline {', '.join(map(repr, missing))}")
    for key in ("scheduler", "tokenizer"):  # read as objects
        if key in manifest["pipeline"] and not isinstance(manifest["pipeline"][key], dict):
            refuse(f"has a {type(manifest['pipeline'][key]).__name__} for pipeline {key!r}, not an object")
    if not manifest["components"]:
        refuse("lists no components")
    for name, comp in manifest["components"].items():
        for key, kind in COMPONENT_REQUIRED.items():
            if not isinstance(comp, dict) or not isinstance(comp.get(key), kind):
                refuse(f"lacks a {key!r} {kind.__name__} for component {name!r}")
        # Every path stays in the artifact: the checks open what the manifest lists (a hand-made one listed ../ and
        # absolute paths, and verify_files read them), and the loaders open <component>/... .
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            refuse(f"names a component {name!r}; component names are letters, digits and '_'")
        outside = next((rel for rel in comp["files"] if not _inside(rel, name)), None)
        if outside is not None:
            refuse(f"lists {outside!r} for component {name!r}, outside its folder {name}/")
    tokenizer = manifest["pipeline"].get("tokenizer")
    if isinstance(tokenizer, dict):
        folder, files = tokenizer.get("folder", "tokenizer"), tokenizer.get("files", {})
        if not isinstance(folder, str) or not re.fullmatch(r"[A-Za-z0-9_]+", folder) or not isinstance(files, dict) \
                or not all(isinstance(f, str) and f not in ("", ".", "..") and not set(f) & set("/\\\0") for f in files):
            refuse("names tokenizer files outside a folder of the artifact")
    for i, entry in enumerate(manifest["loras"]):
        if not isinstance(entry, dict) or not all(k in entry for k in ("path", "sha256", "scale")):
            refuse(f"has LoRA entry {i} without its path, sha256 and scale")


def write_manifest(folder: str | Path, manifest: dict) -> None:
    body = {k: v for k, v in manifest.items() if k != "digest"} | {"format": FORMAT}
    body = json.loads(json.dumps(body))  # as it reads back (tuples as lists), so that the digest checks
    atomic.write_json(Path(folder) / MANIFEST, {**body, "digest": _digest(body)})


def hash_files(folder: Path, names: list[str]) -> dict[str, str]:
    return {name: atomic.sha256_file(folder / name) for name in names}


def verify_files(folder: str | Path, manifest: dict, components: list[str] | None = None) -> None:
    """Refuse an artifact whose files are missing or differ from what the manifest recorded, or that
    holds a file its loaders would read without the manifest vouching for it."""
    folder = Path(folder)
    for name, comp in manifest["components"].items():
        if components is not None and name not in components:
            continue
        # The files the loaders open must be vouched for: a manifest whose list was emptied or cut
        # would otherwise let any graph, weights or engine in the folder run unchecked.
        opened = [f"{name}/model.onnx", *([f"{name}/engine.plan"] if "engine" in comp else []),
                  *([f"{name}/model.onnx.data"] if (folder / name / "model.onnx.data").is_file() else [])]
        unlisted = [rel for rel in opened if rel not in comp["files"]]
        if unlisted:
            raise ArtifactError(f"{folder / MANIFEST} lists no sha256 for {unlisted[0]}, so it cannot be checked; re-run `diffrt export`")
        for rel, digest in comp["files"].items():
            _check_file(folder / rel, digest)
        _check_external_data(folder, name, comp["files"])
    tokenizer = manifest["pipeline"].get("tokenizer")
    if components is None and isinstance(tokenizer, dict):
        # The tokenizer reads whatever its folder holds (tokenizer.json before vocab.json + merges.txt).
        tok, listed = folder / tokenizer.get("folder", "tokenizer"), tokenizer.get("files", {})
        extra = sorted(p.name for p in tok.iterdir() if p.is_file() and p.name not in listed and not p.name.startswith(".")) \
            if tok.is_dir() else []
        if extra:
            raise ArtifactError(f"{tok / extra[0]} is not listed in {MANIFEST}, and the tokenizer would read it; re-run `diffrt export`")
        for name, digest in listed.items():
            _check_file(tok / name, digest)


def _check_external_data(folder: Path, name: str, files: dict) -> None:
    """Every external data file the component's graph names must be one hashed here: ONNX Runtime, TensorRT's
    parser and a refit read whatever the graph names (one inside its folder, else refused by external_data_files)."""
    from diffrt.export.onnx import external_data_files

    graph = folder / name / "model.onnx"
    unlisted = [data for data in external_data_files(graph) if f"{name}/{data}" not in files]
    if unlisted:
        raise ArtifactError(f"{graph} names external data {unlisted[0]}, for which {folder / MANIFEST} lists no sha256, "
                            "so it cannot be checked; re-run `diffrt export`")


def _check_file(path: Path, digest: str) -> None:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing from the artifact; re-run `diffrt export`")
    if atomic.sha256_file(path) != digest:
        raise ArtifactError(f"{path} does not match its sha256 in {MANIFEST} (edited or corrupt); re-run `diffrt export` to rebuild it")


def check_engine_compatible(engine: dict, device=None) -> None:
    """An engine built with another TensorRT or on another GPU model than `device`'s (None: the current one) is
    refused, never run."""
    versions, here = library_versions(), gpu_identity(device)
    if engine.get("tensorrt") != versions["tensorrt"]:
        raise ArtifactError(f"engine was built with TensorRT {engine.get('tensorrt')}, this machine has {versions['tensorrt']}; rebuild it with `diffrt export --backend tensorrt`")
    if here is None or engine.get("gpu") != here:
        raise ArtifactError(f"engine was built for {engine.get('gpu')}, this machine has {here}; rebuild it with `diffrt export --backend tensorrt`")
