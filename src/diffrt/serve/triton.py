"""Triton Inference Server: a model repository whose Python-backend model runs diffrt's runtime.

    diffrt triton-repo --model runs/sd-trt --out model_repository
    tritonserver --model-repository model_repository        # KServe v2 over HTTP and gRPC

For fleets that standardise on Triton (RELIABILITY's serving conventions). `write_repository`
writes `<out>/<name>/config.pbtxt` and `<out>/<name>/1/model.py`, and puts the model (an artifact
from `diffrt export`, a diffusers folder) in `1/model` by hard links where the filesystem allows,
so the repository is self-contained and can be synced or mounted as it is.

One model drives the whole loop, engines included, in its stub process: the same `ServeRuntime`
as `diffrt serve` (one worker owning the pipeline, exact batching, the NaN self-test before the
model turns ready, the backend reported with every answer). Splitting the components into
`tensorrt_plan` models called through BLS would cost a round trip through the stub's shared
memory per UNet call (two per step with guidance) and forbid replaying a step as one CUDA graph;
what Triton adds here is its protocol, its queue and dynamic batcher, instance groups (one
instance per GPU, each with its own pipeline) and its metrics endpoint, to which the model adds
its per-stage times.

A request is KServe v2 with diffusers' argument names, every input optional, one generation per
row of the batch dimension (`[1, 1]` for one): strings as BYTES, integers INT64, floats FP64 (so
eta 0.3 is the 0.3 of the HTTP API), images (`image` for image-to-image, `control_image`, one per
ControlNet) as raw PNG bytes.
The answer: `images` UINT8 [rows, num_images, H, W, C], `seed` (the one drawn when left out),
`backend`, and for text-to-image models the prompt text cut off at the encoder's length
(`truncated`, `truncated_negative`, "" when nothing was: RELIABILITY #13). A refused request gets
the message `diffrt serve` would give, as a Triton error (INVALID_ARG for bad input, UNAVAILABLE
when the queue is full), the same over HTTP and gRPC. A request Triton marks cancelled (its gRPC
deadline passed, its call cancelled) gives up its rows: queued ones leave the queue, a running
batch of only such rows stops at its next step.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import site
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from diffrt import atomic
from diffrt.errors import DiffrtError
from diffrt.serve.schema import GenerateBody, RequestError, describe_validation_errors

log = logging.getLogger(__name__)

VERSION = "1"
MODEL_DIR = "model"  # inside the version folder

# The inputs, one per GenerateBody field: (Triton data type, dims without the batch dimension).
INPUTS: dict[str, tuple[str, list[int]]] = {
    "prompt": ("TYPE_STRING", [1]),
    "negative_prompt": ("TYPE_STRING", [1]),
    "class_label": ("TYPE_INT64", [1]),
    "num_inference_steps": ("TYPE_INT64", [1]),
    "guidance_scale": ("TYPE_FP64", [1]),
    "guidance_rescale": ("TYPE_FP64", [1]),
    "seed": ("TYPE_INT64", [1]),
    "height": ("TYPE_INT64", [1]),
    "width": ("TYPE_INT64", [1]),
    "num_images": ("TYPE_INT64", [1]),
    "eta": ("TYPE_FP64", [1]),
    "scheduler": ("TYPE_STRING", [1]),  # "ddim", "lcm", "dpm", "euler" or "euler_a"; left out: the model's own sampler
    "color": ("TYPE_STRING", [1]),
    "color_scale": ("TYPE_FP64", [1]),
    "control_image": ("TYPE_STRING", [-1]),  # raw PNG bytes, one per ControlNet
    "controlnet_conditioning_scale": ("TYPE_FP64", [-1]),  # one for all ControlNets, or one each
    "lora_scale": ("TYPE_FP64", [1]),
    "image": ("TYPE_STRING", [1]),  # image-to-image: raw PNG bytes
    "strength": ("TYPE_FP64", [1]),
}
TEXT_ONLY = ("prompt", "negative_prompt", "guidance_rescale", "image", "strength")
CONTROL_ONLY = ("control_image", "controlnet_conditioning_scale")
PIXEL_ONLY = ("class_label",)
TRUNCATED = ("truncated", "truncated_negative")  # text-to-image outputs: the prompt text cut off

# RequestError statuses -> Triton error codes (pb_utils.TritonError's attribute names); 499: the
# client cancelled (a gRPC deadline passed, a cancelled call), answered only because Triton wants an answer.
ERROR_CODES = {400: "INVALID_ARG", 413: "INVALID_ARG", 422: "INVALID_ARG", 429: "UNAVAILABLE", 503: "UNAVAILABLE",
               504: "UNAVAILABLE", 499: "CANCELLED"}
CANCEL_POLL_S = 0.2  # how often a waiting execute asks Triton whether its requests' clients are still there

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


# -- requests and answers (no Triton needed: tested on their own) ------------------------------

def _scalar(name: str, value):
    kind = INPUTS[name][0]
    if kind == "TYPE_STRING":
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(422, f"{name}: not UTF-8 text", name) from None
    return int(value) if kind == "TYPE_INT64" else float(value)


def _field(name: str, row: np.ndarray):
    """One row of one input -> the GenerateBody value."""
    values = list(np.asarray(row, dtype=object if INPUTS[name][0] == "TYPE_STRING" else None).reshape(-1))
    if name in ("control_image", "image"):  # raw PNG bytes; the HTTP API's base64
        images = [base64.b64encode(bytes(v)).decode("ascii") for v in values]
        if name == "image" and len(images) != 1:
            raise RequestError(422, f"image: one image per row, got {len(images)}", name)
        return images[0] if len(images) == 1 else images
    if name == "controlnet_conditioning_scale":
        scales = [float(v) for v in values]
        return scales[0] if len(scales) == 1 else scales
    if len(values) != 1:
        raise RequestError(422, f"{name}: one value per row, got {len(values)}", name)
    return _scalar(name, values[0])


def bodies_from_inputs(inputs: dict[str, np.ndarray]) -> list[GenerateBody]:
    """A request's input arrays ([rows, ...] each) -> one GenerateBody per row, checked as the HTTP
    API checks them; RequestError 422 naming the field otherwise."""
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise RequestError(422, f"unknown input {unknown[0]!r}; inputs: {', '.join(INPUTS)}", unknown[0])
    rows = {name: len(array) for name, array in inputs.items()}
    if len(set(rows.values())) > 1:
        raise RequestError(422, f"inputs disagree on the batch dimension: {rows}")
    bodies = []
    for row in range(next(iter(rows.values()), 1)):
        fields = {name: _field(name, array[row]) for name, array in inputs.items()}
        try:
            bodies.append(GenerateBody.model_validate(fields))
        except Exception as exc:  # pydantic's ValidationError
            if not hasattr(exc, "errors"):
                raise
            status, message, _ = describe_validation_errors(exc.errors(include_input=False))
            raise RequestError(status, message) from None
    return bodies


def check_row_shapes(plans: list) -> None:
    """The rows of one request answer in one tensor, so they must make images of one shape: checked
    on their plans (sizes resolved, from a control image too) before any of them runs."""
    if len({(plan.num_images, plan.settings["height"], plan.settings["width"]) for plan in plans}) > 1:
        raise RequestError(422, "the rows of one request must ask for the same num_images, height and width; "
                                "send differing ones as separate requests")


def outputs_from_answers(answers: list, text_to_image: bool) -> dict[str, np.ndarray]:
    """One answer per row (uint8 images, of one shape: check_row_shapes) -> the output arrays."""
    images = [np.stack(answer.images) for answer in answers]  # one shape: check_row_shapes
    outputs = {
        "images": np.stack(images),
        "seed": np.array([[answer.seed] for answer in answers], dtype=np.int64),
        "backend": np.array([[answer.backend.encode()] for answer in answers], dtype=object),
    }
    if text_to_image:
        for key in TRUNCATED:
            cut = [((answer.truncated or {}).get(key) or [None])[0] for answer in answers]
            outputs[key] = np.array([[(text or "").encode()] for text in cut], dtype=object)
    return outputs


# -- the repository --------------------------------------------------------------------------

# The RuntimeConfig fields a repository sets, as config.pbtxt parameters (operators may edit them there).
PASSED_ON = ("backend", "max_queue", "timeout_s", "max_image_side", "exact_batching", "strict", "cuda_graph")


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
    max_image_side: int = 2048
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
    from diffrt.export.manifest import MANIFEST, read_manifest
    from diffrt.export.text_to_image import exported_controlnets
    from diffrt.runtime.opening import is_text_to_image

    if not is_text_to_image(model):
        return False, False
    folder = Path(model)  # a diffusers folder runs no ControlNet here (serve's --controlnet has no counterpart)
    return True, (folder / MANIFEST).is_file() and bool(exported_controlnets(read_manifest(folder)))


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
    params = [f"parameters {{ key: {_text(key)} value: {{ string_value: {_text(_param_text(value))} }} }}"
              for key, value in parameters.items()]
    return "\n".join([
        f"name: {_text(config.name)}",
        'backend: "python"',
        f"max_batch_size: {config.max_batch_size}",
        f"dynamic_batching {{ max_queue_delay_microseconds: {round(config.queue_delay_ms * 1000)} }}",
        "input [", ",\n".join(inputs), "]",
        "output [", ",\n".join(outputs), "]",
        f"instance_group [ {{ count: {config.instances} kind: {kind} }} ]",
        *params, "",
    ])


def _place(src: Path, dst: Path) -> None:
    """The model's files under dst: hard links where the filesystem allows (no second copy of
    gigabytes of weights), copies where it does not."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def write_repository(out: str | Path, config: RepositoryConfig) -> Path:
    """Write `<out>/<config.name>` (config.pbtxt, 1/model.py, 1/model/) and return its path. The
    model folder is written to a temporary name and renamed: an interrupted run leaves nothing
    Triton would load."""
    from diffrt.serve.runtime import served_model

    model = served_model(config.model, config.backend)
    if config.device is None:  # the serving machine may not be this one: cuda is not required here
        import torch

        config = replace(config, device="cuda" if config.backend == "tensorrt" or torch.cuda.is_available() else "cpu")
    if config.device not in ("cpu", "cuda"):
        raise DiffrtError(f"--device {config.device!r}: cpu or cuda (Triton places the instances on its GPUs)")
    if config.max_batch_size < 1 or config.instances < 1:
        raise DiffrtError("--max-batch-size and --instances must be at least 1")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", config.name):
        raise DiffrtError(f"--name {config.name!r}: a Triton model name here is letters, digits, '_', '.' and '-', not starting with '.' or '-'")
    text_to_image, controlnet = model_kind(model)
    out = Path(out)
    final = out / config.name
    if final.exists():
        raise DiffrtError(f"{final} already exists; remove it or pick another --name")
    out.mkdir(parents=True, exist_ok=True)
    staging = atomic.make_temp_dir(out, f".{config.name}.tmp-")
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
            _place(Path(model), version / MODEL_DIR)
            parameter = MODEL_DIR
        (version / "model.py").write_text(MODEL_PY)
        (staging / "config.pbtxt").write_text(config_pbtxt(config, parameter, text_to_image, controlnet))
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


# -- a local tritonserver: trying a repository out, the tests, the benchmark --------------------

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


# -- the model Triton's Python backend runs ----------------------------------------------------

def _cancelled(request) -> bool:
    """Whether Triton has marked the request cancelled (its client gone); False where the backend
    cannot tell (request.is_cancelled: Triton 23.10 and later)."""
    try:
        return bool(request.is_cancelled())
    except Exception:  # noqa: BLE001 - an older stub without it, or a request that is not a Triton one
        return False


def _param_text(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _parameter_types() -> dict[str, type]:
    """Each parameter's type: the model's path, and the RuntimeConfig fields a repository sets (their defaults' types)."""
    from dataclasses import fields

    from diffrt.serve.runtime import RuntimeConfig

    return {"model": str, **{f.name: type(f.default) for f in fields(RuntimeConfig) if f.name in PASSED_ON}}


def _parameters(model_config: dict) -> dict:
    """config.pbtxt's parameters (strings, as an operator edits them), typed."""
    typed, types = {}, _parameter_types()
    for key, value in model_config.get("parameters", {}).items():
        text, kind = value["string_value"].strip(), types.get(key)
        if kind is None:  # the Python backend's own (EXECUTION_ENV_PATH, ...)
            continue
        try:
            if kind is bool:
                if text.lower() not in ("true", "false"):
                    raise ValueError(text)
                typed[key] = text.lower() == "true"
            else:
                typed[key] = kind(text)
        except ValueError:
            raise DiffrtError(f"config.pbtxt: parameter {key!r} is {text!r}, not a {kind.__name__}") from None
    return typed


def runtime_config(args: dict):
    """The RuntimeConfig of one model instance, from Triton's `initialize` arguments."""
    from diffrt.serve.runtime import RuntimeConfig

    model_config = json.loads(args["model_config"])
    p = _parameters(model_config)
    model = p.get("model") or None
    if model is not None and not Path(model).is_absolute():
        model = str(Path(args["model_repository"]) / args["model_version"] / model)
    if model is not None:
        try:
            model.encode(sys.getfilesystemencoding())
        except UnicodeEncodeError:  # Path.is_dir() would only say False: "model folder not found"
            raise DiffrtError(f"{model}: this Python names files in {sys.getfilesystemencoding()} (Triton's stub runs with "
                              "an ascii filesystem encoding), which cannot spell this path; move the model repository "
                              "to an ASCII path") from None
    device = f"cuda:{args['model_instance_device_id']}" if args.get("model_instance_kind") == "GPU" else "cpu"
    # Triton's batcher has gathered the requests: the runtime's own window need only cover their planning.
    return RuntimeConfig(model=model, device=device, max_batch_size=int(model_config.get("max_batch_size") or 1), batch_wait_ms=1.0,
                         **{name: p[name] for name in PASSED_ON if name in p})


def check_numpy_abi(pb_utils) -> None:
    """Refuse a stub that misreads this numpy's arrays. The Python backend's stub is compiled
    against one numpy ABI; a stub built for numpy 1 running under numpy 2 reads element sizes
    wrongly for memory it did not get from numpy (every request's inputs, in shared memory): an
    input comes back as copies of its first element, outputs are refused and strings crash the
    stub. A tensor over torch's memory, read back as numpy, finds it before any request."""
    import torch

    probe = torch.arange(1, 5, dtype=torch.int64)
    try:
        back = pb_utils.Tensor.from_dlpack("probe", probe).as_numpy()
        same = np.array_equal(back, probe.numpy())
    except Exception:  # noqa: BLE001 - any failure here is the same mismatch
        same = False
    if not same:
        raise DiffrtError(f"this Triton Python backend stub misreads numpy {np.__version__} arrays (it was built against "
                          "another numpy ABI, e.g. numpy 1 under numpy 2); give the stub the numpy it was built for, "
                          "such as numpy<2 first on PYTHONPATH")


class TritonPythonModel:
    """Triton calls `initialize` once per instance, `execute` with the requests its dynamic batcher
    gathered, and `finalize` at unload."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        from diffrt.serve.runtime import ServeRuntime

        self.pb = pb_utils
        check_numpy_abi(pb_utils)
        config = runtime_config(args)
        self.inputs = [i["name"] for i in json.loads(args["model_config"])["input"]]
        self.runtime = ServeRuntime(config)
        self.runtime.start()
        self.runtime.wait_ready(timeout=3600)  # a load error fails the model's load, with its message
        self.text_to_image = self.runtime.describe()["kind"] == "text-to-image"
        self.stage_ms = self._metric("diffrt_stage_milliseconds_total", "time spent per stage (text encoder, UNet x N, VAE, encode)")
        self.images_made = self._metric("diffrt_images_total", "images generated, by the backend that ran them")
        self.metrics: dict[tuple[int, str], object] = {}  # (family, label value) -> Triton metric, made once
        self.model_name = args.get("model_name", "")  # several diffrt models in one server: their own series
        log.info("diffrt model ready: %s", self.runtime.describe())

    def _metric(self, name: str, description: str):
        family = getattr(self.pb, "MetricFamily", None)  # custom metrics: Triton 23.05 and later
        return None if family is None else family(name=name, description=description, kind=family.COUNTER)

    def execute(self, requests: list) -> list:
        pending = [self._submit(request) for request in requests]  # all queued first: the runtime batches them
        together = list(zip(requests, pending))
        return [self._respond(item, request, together) for request, item in together]

    def _submit(self, request):
        jobs = []
        try:
            arrays = {}
            for name in self.inputs:
                tensor = self.pb.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    arrays[name] = tensor.as_numpy()
            for body in bodies_from_inputs(arrays):
                jobs.append(self.runtime.submit(body, encoding="uint8"))
            check_row_shapes([job.payload for job in jobs])
        except Exception as exc:  # noqa: BLE001 - one request's failure, answered on its own
            for job in jobs:  # a later row was refused: the earlier ones give up their queue slots
                job.future.cancel()
            if isinstance(exc, RequestError):
                return exc
            log.error("planning a request failed", exc_info=exc)
            return RequestError(500, f"planning the request failed: {type(exc).__name__}: {exc}")
        return jobs

    def _respond(self, item, request=None, together: list = ()):
        try:
            if isinstance(item, RequestError):
                raise item
            answers = []
            for job in item:
                self._wait_or_drop(job, together)
                made = job.future.done() and not job.future.cancelled() and job.future.exception() is None
                if not made and _cancelled(request):  # images made all the same are answered and counted
                    raise RequestError(499, "the client cancelled the request (its gRPC deadline passed or it hung up) "
                                            "before its images were made")
                answers.append(self.runtime.wait(job))
            outputs = outputs_from_answers(answers, self.text_to_image)
        except RequestError as exc:
            for job in item if isinstance(item, list) else ():  # one row failed: the rest are not waited for
                job.future.cancel()
            code = getattr(self.pb.TritonError, ERROR_CODES.get(exc.status, "INTERNAL"), None)
            error = self.pb.TritonError(exc.message) if code is None else self.pb.TritonError(exc.message, code)
            return self.pb.InferenceResponse(output_tensors=[], error=error)
        self._count(answers)
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(name, array) for name, array in outputs.items()])

    def _wait_or_drop(self, job, together: list) -> None:
        """Wait for a job (up to its deadline: runtime.wait answers the timeout) while giving up the
        rows of requests whose client has gone: Triton marks a request cancelled when its gRPC
        deadline passes or the call is cancelled, and its rows would otherwise still be generated,
        ahead of live requests. Nobody waits for them from now (their deadline): a queued row leaves
        the queue, a running batch whose every row is given up stops at its next step."""
        from concurrent.futures import wait

        from diffrt.serve.runtime import give_up

        while not job.future.done() and time.monotonic() < job.deadline:
            for request, item in together:
                if isinstance(item, list) and any(not j.future.done() for j in item) and _cancelled(request):
                    give_up(item)
            wait([job.future], timeout=CANCEL_POLL_S)

    def _count(self, answers: list) -> None:
        if self.stage_ms is None:
            return
        for answer in answers:
            self._counter(self.images_made, "backend", answer.backend).increment(len(answer.images))
            for stage, ms in answer.timings_ms.items():
                self._counter(self.stage_ms, "stage", stage).increment(ms)

    def _counter(self, family, label: str, value: str):
        key = (id(family), value)
        if key not in self.metrics:
            self.metrics[key] = family.Metric(labels={"model": self.model_name, label: value})
        return self.metrics[key]

    def finalize(self) -> None:
        self.runtime.close(timeout=self.runtime.config.timeout_s + 5)
