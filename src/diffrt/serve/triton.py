"""Triton Inference Server: the Python-backend model that runs diffrt's runtime, and its protocol.

    diffrt triton-repo --model runs/sd-trt --out model_repository     # triton_repo.py
    tritonserver --model-repository model_repository        # KServe v2 over HTTP and gRPC

For fleets that standardise on Triton (RELIABILITY's serving conventions). One model drives the
whole loop, engines included, in its stub process: the same `ServeRuntime` as `diffrt serve` (one
worker owning the pipeline, exact batching, the NaN self-test before the model turns ready, the
backend reported with every answer). Splitting the components into `tensorrt_plan` models called
through BLS would cost a round trip through the stub's shared memory per UNet call (two per step
with guidance) and forbid replaying a step as one CUDA graph; what Triton adds here is its
protocol, its queue and dynamic batcher, instance groups (one instance per GPU, each with its own
pipeline) and its metrics endpoint, to which the model adds its per-stage times.

A request is KServe v2 with diffusers' argument names, one generation per row of the batch dimension
(`[1, 1]` for one): strings as BYTES, integers INT64, floats FP64 (so eta 0.3 is the 0.3 of the HTTP
API), images (`image` for image-to-image, `control_image`, one per ControlNet) as raw PNG bytes. Every
input is optional, its default the HTTP API's, but Triton refuses a request of no inputs at all: send
one at least (`seed`, or `prompt`).
The answer: `images` UINT8 [rows, num_images, H, W, C], `seed` (the one drawn when left out),
`backend`, and for text-to-image models the prompt text cut off at the encoder's length
(`truncated`, `truncated_negative`, "" when nothing was: RELIABILITY #13). A refused request gets
the message `diffrt serve` would give, as a Triton error (INVALID_ARG for bad input), the same over HTTP and
gRPC. Requests wait in Triton's queue (an execute gets at most max_batch_size rows), which config.pbtxt's
queue policy holds to --max-queue requests and --timeout seconds: Triton refuses one past either (UNAVAILABLE). A request Triton marks cancelled (its gRPC
deadline passed, its call cancelled) gives up its rows: queued ones leave the queue, a running
batch of only such rows stops at its next step.

The model's settings are config.pbtxt's parameters (PASSED_ON, written by triton_repo.py).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from diffrt.errors import DiffrtError
from diffrt.serve.schema import GenerateBody, RequestError, describe_validation_errors

log = logging.getLogger(__name__)


# The inputs, one per GenerateBody field: (Triton data type, dims without the batch dimension).
INPUTS: dict[str, tuple[str, list[int]]] = {
    "prompt": ("TYPE_STRING", [1]),
    "negative_prompt": ("TYPE_STRING", [1]),
    "class_label": ("TYPE_INT64", [1]),
    "num_inference_steps": ("TYPE_INT64", [1]),
    "guidance_scale": ("TYPE_FP64", [1]),
    "guidance_rescale": ("TYPE_FP64", [1]),
    "clip_skip": ("TYPE_INT64", [1]),
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
    "control_guidance_start": ("TYPE_FP64", [-1]),  # likewise
    "control_guidance_end": ("TYPE_FP64", [-1]),
    "guess_mode": ("TYPE_BOOL", [1]),
    "lora_scale": ("TYPE_FP64", [1]),
    "image": ("TYPE_STRING", [1]),  # image-to-image: raw PNG bytes
    "strength": ("TYPE_FP64", [1]),
}
TEXT_ONLY = ("prompt", "negative_prompt", "guidance_rescale", "image", "strength", "clip_skip")
CONTROL_ONLY = ("control_image", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end", "guess_mode")
PIXEL_ONLY = ("class_label",)
TRUNCATED = ("truncated", "truncated_negative")  # text-to-image outputs: the prompt text cut off

# RequestError statuses -> Triton error codes (pb_utils.TritonError's attribute names); 499: the
# client cancelled (a gRPC deadline passed, a cancelled call), answered only because Triton wants an answer.
ERROR_CODES = {400: "INVALID_ARG", 413: "INVALID_ARG", 422: "INVALID_ARG", 429: "UNAVAILABLE", 503: "UNAVAILABLE",
               504: "UNAVAILABLE", 499: "CANCELLED"}
CANCEL_POLL_S = 0.2  # how often a waiting execute asks Triton whether its requests' clients are still there
END_GRACE_S = 2.0  # seconds between answering the requests of a dead runtime and ending the stub (TritonPythonModel._dead)

# The RuntimeConfig fields a repository sets, as config.pbtxt parameters (operators may edit them there).
PASSED_ON = ("backend", "timeout_s", "max_image_side", "exact_batching", "strict", "cuda_graph")


# -- requests and answers (no Triton needed: tested on their own) ------------------------------

def _scalar(name: str, value):
    kind = INPUTS[name][0]
    if kind == "TYPE_STRING":
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(422, f"{name}: not UTF-8 text", name) from None
    return int(value) if kind == "TYPE_INT64" else bool(value) if kind == "TYPE_BOOL" else float(value)


def _field(name: str, row: np.ndarray):
    """One row of one input -> the GenerateBody value."""
    values = list(np.asarray(row, dtype=object if INPUTS[name][0] == "TYPE_STRING" else None).reshape(-1))
    if name in ("control_image", "image"):  # raw PNG bytes; the HTTP API's base64
        images = [base64.b64encode(bytes(v)).decode("ascii") for v in values]
        if name == "image" and len(images) != 1:
            raise RequestError(422, f"image: one image per row, got {len(images)}", name)
        return images[0] if len(images) == 1 else images
    if name in ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end"):  # one, or one per ControlNet
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
    if 0 in rows.values():  # Triton refuses such a request itself; an answer of no rows has no shape to give
        raise RequestError(422, "the inputs have 0 rows; send one row per generation (shape [1, 1] for one)")
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
    on their plans (sizes resolved, from a control image too) before any of them is queued."""
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
            cut = [answer.cut_off(key) for answer in answers]
            outputs[key] = np.array([[(text or "").encode()] for text in cut], dtype=object)
    return outputs


# -- the model Triton's Python backend runs ----------------------------------------------------

def _cancelled(request) -> bool:
    """Whether Triton has marked the request cancelled (its client gone); False where the backend
    cannot tell (request.is_cancelled: Triton 23.10 and later)."""
    try:
        return bool(request.is_cancelled())
    except Exception:  # noqa: BLE001 - an older stub without it, or a request that is not a Triton one
        return False


def _parameter_types() -> dict[str, type]:
    """Each parameter's type: the model's path, and the RuntimeConfig fields a repository sets (their defaults' types)."""
    from dataclasses import fields

    from diffrt.serve.runtime import RuntimeConfig

    return {"model": str, **{f.name: type(f.default) for f in fields(RuntimeConfig) if f.name in PASSED_ON}}


def _parameters(model_config: dict) -> dict:
    """config.pbtxt's parameters (strings, as an operator edits them), typed."""
    from diffrt.serve.runtime import setting_from_text

    typed, types = {}, _parameter_types()
    for key, value in model_config.get("parameters", {}).items():
        text, kind = value["string_value"].strip(), types.get(key)
        if kind is None:  # the Python backend's own (EXECUTION_ENV_PATH, ...)
            continue
        try:
            typed[key] = setting_from_text(text, kind)
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
    # Triton's batcher has gathered the requests, and the model queues their rows together once all are planned: the
    # runtime's own window need only cover that. Requests wait in Triton's queue (--max-queue is its max_queue_size);
    # the runtime's holds the rows of one execute, at most max_batch_size (Triton counts rows against it): a queue of
    # --max-queue rows refused a request of more rows than that, or not, by how fast the worker took the first ones.
    max_batch_size = int(model_config.get("max_batch_size") or 1)
    return RuntimeConfig(model=model, device=device, max_batch_size=max_batch_size, batch_wait_ms=1.0, max_queue=max_batch_size,
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
        self._ending = False  # the runtime died and the stub's end is set (_dead)
        log.info("diffrt model ready: %s", self.runtime.describe())

    def _metric(self, name: str, description: str):
        family = getattr(self.pb, "MetricFamily", None)  # custom metrics: Triton 23.05 and later
        return None if family is None else family(name=name, description=description, kind=family.COUNTER)

    def execute(self, requests: list) -> list:
        if not self.runtime.alive:
            return self._dead(requests)
        # Every row of every request planned before any is queued: a request refused for one row never had the others
        # run, and the rows reach the runtime's batcher together (planning decodes images: done row by row while
        # queued, it split Triton's batch across the runtime's batch window).
        planned = [self._plan(request) for request in requests]
        together = list(zip(requests, [self._queue(item) for item in planned]))
        return [self._respond(item, request, together) for request, item in together]

    def _plan(self, request) -> list | RequestError:
        """A request's rows as prepared jobs, not queued; its refusal, answered on its own, otherwise."""
        try:
            arrays = {}
            for name in self.inputs:
                tensor = self.pb.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    arrays[name] = tensor.as_numpy()
            jobs = [self.runtime.prepare(body, encoding="uint8") for body in bodies_from_inputs(arrays)]
            check_row_shapes([job.payload for job in jobs])
        except RequestError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - one request's failure, answered on its own
            log.error("planning a request failed", exc_info=exc)
            return RequestError(500, f"planning the request failed: {type(exc).__name__}: {exc}")
        return jobs

    def _queue(self, item: list | RequestError) -> list | RequestError:
        """Queue a request's prepared rows; if one is refused (a closing runtime), those queued give up."""
        from diffrt.serve.runtime import give_up

        if isinstance(item, RequestError):
            return item
        for count, job in enumerate(item):
            try:
                self.runtime.enqueue(job)
            except RequestError as exc:
                give_up(item[:count])
                return exc
        return item

    def _dead(self, requests: list) -> list:
        """The runtime is dead (its worker died, its engine failed batch after batch, a CUDA error that sticks to
        the process): every request is refused with why, and this instance's stub process ends once they are
        answered. Triton sees the stub gone: its Python backend marks the instance not ready (readiness, so an
        orchestrator replaces the server) or restarts the stub, whose fresh process loads the model anew, where
        older versions do; left running, the model stayed READY and failed every request."""
        reason = self.runtime.dead_reason
        if not self._ending:
            self._ending = True
            log.error("diffrt model %s is dead (%s); ending this instance's stub process in %.0f s", self.model_name,
                      reason, END_GRACE_S)
            threading.Timer(END_GRACE_S, self._end_process).start()
        return [self._error(f"{reason}; this model instance is restarting", "UNAVAILABLE") for _ in requests]

    def _error(self, message: str, code: str):
        """An answer of one error; `code` a TritonError attribute, left out on a stub whose TritonError has no codes."""
        code = getattr(self.pb.TritonError, code, None)
        error = self.pb.TritonError(message) if code is None else self.pb.TritonError(message, code)
        return self.pb.InferenceResponse(output_tensors=[], error=error)

    @staticmethod
    def _end_process() -> None:
        os._exit(1)  # no cleanup: the worker is wedged or dead, and Triton ends or restarts what is left

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
            from diffrt.serve.runtime import give_up

            give_up(item if isinstance(item, list) else ())  # one row failed: the rest are not waited for, nor run
            return self._error(exc.message, ERROR_CODES.get(exc.status, "INTERNAL"))
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
