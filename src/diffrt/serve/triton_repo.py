"""`diffrt triton-repo`: a Triton model repository whose Python-backend model runs diffrt's runtime.

`write_repository` writes `<out>/<name>/config.pbtxt` and `<out>/<name>/1/model.py`, and puts the
model (an artifact from `diffrt export`, a diffusers folder) in `1/model` by hard links where the
filesystem allows, so the repository is self-contained and can be synced or mounted as it is. The
model itself, its inputs and outputs, are triton.py's; `triton_server.LocalTritonServer` runs a
repository on this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from diffrt import atomic
from diffrt.errors import DiffrtError
from diffrt.export.manifest import artifact_lock
from diffrt.serve.triton import CONTROL_ONLY, INPUTS, PASSED_ON, PIXEL_ONLY, TEXT_ONLY, TRUNCATED

VERSION = "1"
MODEL_DIR = "model"  # inside the version folder

MODEL_PY = '''"""Triton's Python-backend model for diffrt, written by `diffrt triton-repo`.

Its settings are the parameters in config.pbtxt beside this folder; the code is diffrt's own
(diffrt.serve.triton): the Python that Triton's stub embeds must find diffrt, installed there or
in a site-packages folder named in PYTHONPATH. The stub's interpreter does not read PYTHONPATH
itself, so its entries are added here as site directories (their .pth files too, which is how
editable installs are found).
"""

import os
import site

for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    if entry:
        site.addsitedir(entry)

from diffrt.serve.triton import TritonPythonModel  # noqa: E402, F401
'''


@dataclass
class RepositoryConfig:
    model: str | None = None  # artifact or diffusers folder; None: the shipped digits model
    backend: str = "onnxruntime"
    name: str = "diffrt"
    device: str | None = None  # "cuda": instances on GPUs (KIND_GPU), one pipeline each; None: cuda for tensorrt or with a GPU here
    instances: int = 1  # per GPU with cuda
    max_batch_size: int = 8  # rows Triton's dynamic batcher hands one execute, and images per UNet batch
    queue_delay_ms: float = 10.0  # how long Triton's batcher waits to fill a batch
    max_queue: int = 64
    timeout_s: float = 60.0
    max_image_side: int = 0  # as diffrt serve's: 0 is twice the model's own side on eager PyTorch, 4096 on engines
    exact_batching: bool = True
    strict: bool = False
    cuda_graph: bool = True
    link: bool = False  # True: config names the model's absolute path instead of putting it in the repository


def _dims(dims: list[int]) -> str:
    return f"[ {', '.join(map(str, dims))} ]"


def _text(value: str) -> str:
    """A protobuf text-format string: quotes, backslashes and control characters escaped, other
    characters kept as UTF-8 rather than \\u-escaped (older text-format parsers lack that escape)."""
    return json.dumps(value, ensure_ascii=False)


def model_kind(model: str | None) -> tuple[bool, bool]:
    """(text_to_image, has_controlnet) for the config's inputs, read from files, without loading weights."""
    from diffrt.export.manifest import read_manifest
    from diffrt.runtime.loading import is_artifact
    from diffrt.export.text_to_image import exported_controlnets
    from diffrt.runtime.opening import is_text_to_image

    if not is_text_to_image(model):
        return False, False
    folder = Path(model)  # a diffusers folder runs no ControlNet here (serve's --controlnet has no counterpart)
    return True, is_artifact(folder) and bool(exported_controlnets(read_manifest(folder)))


def param_text(value) -> str:
    """A parameter's value as config.pbtxt spells it (triton._parameters reads it back)."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def config_pbtxt(config: RepositoryConfig, model_parameter: str, text_to_image: bool, controlnet: bool) -> str:
    """config.pbtxt for the Python-backend model: the inputs the model takes, the outputs, dynamic
    batching, instance groups, and diffrt's settings as parameters."""
    leave_out = PIXEL_ONLY if text_to_image else TEXT_ONLY + CONTROL_ONLY
    if text_to_image and not controlnet:
        leave_out += CONTROL_ONLY
    inputs = [f'  {{ name: "{name}" data_type: {kind} dims: {_dims(dims)} optional: true }}'
              for name, (kind, dims) in INPUTS.items() if name not in leave_out]
    outputs = ['  { name: "images" data_type: TYPE_UINT8 dims: [ -1, -1, -1, -1 ] }',
               '  { name: "seed" data_type: TYPE_INT64 dims: [ 1 ] }',
               '  { name: "backend" data_type: TYPE_STRING dims: [ 1 ] }']
    if text_to_image:
        outputs += [f'  {{ name: "{key}" data_type: TYPE_STRING dims: [ 1 ] }}' for key in TRUNCATED]
    kind = "KIND_GPU" if config.device == "cuda" else "KIND_CPU"
    parameters = {"model": model_parameter, **{name: getattr(config, name) for name in PASSED_ON}}
    params = [f"parameters {{ key: {_text(key)} value: {{ string_value: {_text(param_text(value))} }} }}"
              for key, value in parameters.items()]
    return "\n".join([
        f"name: {_text(config.name)}",
        'backend: "python"',
        f"max_batch_size: {config.max_batch_size}",
        # Requests wait in Triton's queue, not the runtime's (an execute gets at most max_batch_size rows): its
        # policy holds them to --max-queue and --timeout, refused when it is full or they waited that long.
        f"dynamic_batching {{ max_queue_delay_microseconds: {round(config.queue_delay_ms * 1000)} default_queue_policy {{ "
        f"timeout_action: REJECT default_timeout_microseconds: {round(config.timeout_s * 1e6)} max_queue_size: {config.max_queue} }} }}",
        "input [", ",\n".join(inputs), "]",
        "output [", ",\n".join(outputs), "]",
        f"instance_group [ {{ count: {config.instances} kind: {kind} }} ]",
        *params, "",
    ])


def _place(src: Path, dst: Path) -> None:
    """The model's files under dst: hard links where the filesystem allows (no second copy of
    gigabytes of weights), copies where it does not. A symbolic link is placed as the file it points
    to, never as a link (a Hugging Face snapshot's ../../blobs/... would dangle in the repository, a
    link to a host path would follow the repository to other machines); see _link_target."""
    from diffrt.export.cache import REBUILD, STAGE

    root = src.resolve()
    for path in sorted(src.rglob("*")):
        if path.relative_to(src).parts[0] in (STAGE, REBUILD):  # what a stopped re-export left: no part of the model
            continue
        target = dst / path.relative_to(src)
        if path.is_symlink():
            source = _link_target(path, root)
        elif path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        else:
            source = path
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)


def _link_target(link: Path, root: Path) -> Path:
    """The file a symbolic link in the model folder `root` points to, if it lies inside that folder or,
    when `root` is a Hugging Face cache snapshot (<repo>/snapshots/<revision>), in that repo's blobs
    folder, where the snapshot's own links point. Anything else is refused: placing it would put a file
    from elsewhere on this machine into a repository that may be shipped."""
    target = link.resolve()
    blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    if not (target.is_relative_to(root) or (blobs is not None and target.parent == blobs)):
        raise DiffrtError(f"{link} is a link to {target}, outside the model folder {root}; copy the file into the folder "
                          "(or use --link to serve the folder where it is)")
    if not target.is_file():
        raise DiffrtError(f"{link} is a link to {target}, which is not a file (linked folders are not followed); "
                          "put what it points to in its place")
    return target


def check_engines(model: str | None, backend: str) -> None:
    """An artifact served on TensorRT must hold its engines: one exported for ONNX Runtime only wrote a repository
    whose every model failed to load on the serving machine. (A diffusers folder is exported where it is served.)"""
    from diffrt.export import manifest as mf
    from diffrt.runtime.loading import is_artifact

    if backend != "tensorrt" or model is None or not is_artifact(Path(model)):
        return
    without = [name for name, comp in mf.read_manifest(model)["components"].items() if "engine" not in comp]
    if without:
        raise DiffrtError(f"--backend tensorrt: {model} has no TensorRT engine for {', '.join(without)} (an ONNX export); "
                          "serve it with --backend onnxruntime, or export it with `diffrt export --backend tensorrt`")


# A folder staged in the repository itself (its parent another filesystem): `.<name>.tmp-<8 hex digits>`.
LEFTOVER = re.compile(r"\.[A-Za-z0-9_][A-Za-z0-9_.-]*\.tmp-[0-9a-f]{8}")
MAX_QUEUE_SIZE = 2**32 - 1  # config.pbtxt's max_queue_size is a uint32


def _staging_place(out: Path, name: str) -> tuple[Path, str]:
    """(folder, prefix) of the temporary folder the model is written in before its rename into `out`: beside the
    repository, not in it. Triton loads every folder of its repository as a model, hidden ones too: one left there by
    a run killed mid-copy (SIGKILL, the OOM killer, a power cut: no cleanup runs) failed its load, and with it the
    server's start. In the repository only where the rename could not come from beside it: a repository that is a
    mount point (another filesystem than its parent's), or a parent this user cannot write."""
    resolved = out.resolve()
    parent = resolved.parent
    # no device comparison: the probe's rename fails with EXDEV across filesystems as across bind mounts
    if parent != resolved and os.access(parent, os.W_OK | os.X_OK) and _renames_into(parent, out):
        return parent, f".{resolved.name}.{name}.tmp-"
    return out, f".{name}.tmp-"


def _renames_into(parent: Path, out: Path) -> bool:
    """Whether what is made in `parent` can be renamed into `out`: one filesystem is not enough, a bind mount (a
    Kubernetes subPath, `mount --bind`) shares its parent's device and still refuses the rename (EXDEV), which came
    after the whole model was placed. Tried on an empty file, which Triton does not take for a model if left."""
    try:  # a parent os.access passes may still refuse the file (root-squashed NFS, ACLs): stage inside then
        probe = atomic.make_temp_file(parent, f".{out.name}.probe-")
    except OSError:
        return False
    moved = out / probe.name
    try:
        os.rename(probe, moved)
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
        moved.unlink(missing_ok=True)
    return True


def check_no_leftovers(out: Path) -> None:
    """Refuse a repository holding a folder an interrupted `diffrt triton-repo` staged in it (_staging_place): Triton
    would fail to load it as a model and not start. Named for the user to remove, not removed here: another run may be
    writing it now."""
    left = sorted(p.name for p in out.iterdir() if p.is_dir() and LEFTOVER.fullmatch(p.name))
    if left:
        raise DiffrtError(f"{out / left[0]} is a folder an interrupted `diffrt triton-repo` left in the repository, or one "
                          "another triton-repo is writing now; Triton would fail to load it as a model and not start: once "
                          "no other triton-repo runs, remove it")


def write_repository(out: str | Path, config: RepositoryConfig) -> Path:
    """Write `<out>/<config.name>` (config.pbtxt, 1/model.py, 1/model/) and return its path. The
    model folder is written under a temporary name beside the repository and renamed into it: an
    interrupted run leaves nothing Triton would load (_staging_place)."""
    from diffrt.serve.runtime import check_max_image_side, check_service_settings, served_model

    atomic.check_writable(out, folder=True)
    model = served_model(config.model, config.backend, here=False)  # served by Triton, maybe on another machine
    # Checked here, as `diffrt serve` checks them, rather than when Triton loads the model and its runtime refuses them.
    check_service_settings(max_batch_size=config.max_batch_size, max_queue=config.max_queue, batch_wait_ms=config.queue_delay_ms,
                           timeout_s=config.timeout_s, wait_name="--queue-delay-ms")
    check_max_image_side(config.max_image_side)
    if config.device is None:  # the serving machine may not be this one: cuda is not required here
        import torch

        config = replace(config, device="cuda" if config.backend == "tensorrt" or torch.cuda.is_available() else "cpu")
    if config.device not in ("cpu", "cuda"):
        raise DiffrtError(f"--device {config.device!r}: cpu or cuda (Triton places the instances on its GPUs)")
    if config.backend == "tensorrt" and config.device == "cpu":  # every instance would fail its load on the server
        raise DiffrtError("--backend tensorrt runs on a CUDA device, not --device cpu; pass --device cuda (or leave it out)")
    # config.pbtxt's queue policy: whole microseconds (0 there means no timeout at all) and a 32-bit queue size.
    if round(config.timeout_s * 1e6) < 1:
        raise DiffrtError(f"--timeout {config.timeout_s!r}: at least 1 microsecond (Triton counts whole microseconds, "
                          "and reads 0 as no timeout)")
    if config.max_queue > MAX_QUEUE_SIZE:
        raise DiffrtError(f"--max-queue {config.max_queue}: Triton's queue holds at most {MAX_QUEUE_SIZE} requests")
    if config.max_batch_size < 1 or config.instances < 1:
        raise DiffrtError("--max-batch-size and --instances must be at least 1")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", config.name):
        raise DiffrtError(f"--name {config.name!r}: a Triton model name here is letters, digits, '_', '.' and '-', not starting with '.' or '-'")
    check_engines(model, config.backend)
    text_to_image, controlnet = model_kind(model)
    out = Path(out)
    final = out / config.name
    if final.exists():
        raise DiffrtError(f"{final} already exists; remove it or pick another --name")
    out.mkdir(parents=True, exist_ok=True)
    check_no_leftovers(out)
    staging = atomic.make_temp_dir(*_staging_place(out, config.name))
    try:
        version = staging / VERSION
        version.mkdir()
        if model is None:
            parameter = ""
        elif config.link:
            parameter = str(Path(model).resolve())
            if not parameter.isascii():
                raise DiffrtError(f"--link {parameter}: Triton's Python stub names files in ASCII only (its filesystem "
                                  "encoding is ascii), so it could not open this path; leave --link out (the model is "
                                  "placed in the repository) or move the model to an ASCII path")
        else:
            from diffrt.runtime.loading import is_artifact

            with artifact_lock(model, shared=True) if is_artifact(Path(model)) else contextlib.nullcontext():  # not rewritten while linked
                _place(Path(model), version / MODEL_DIR)
            parameter = MODEL_DIR
        (version / "model.py").write_text(MODEL_PY)
        (staging / "config.pbtxt").write_text(config_pbtxt(config, parameter, text_to_image, controlnet))
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final
