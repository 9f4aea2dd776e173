"""`diffrt triton-repo`: a Triton Inference Server model repository, served by a real tritonserver.

The server is the Triton build that nvidia-pytriton's wheel carries (`make tritonserver` puts it
in the venv; the tests skip where it is not there, e.g. off Linux x86_64). It loads the
repository `write_repository` writes, with its Python backend running diffrt in the stub
process, and the tests speak KServe v2 over HTTP to it:

* a request's images are the pixels `diffrt generate` writes for the same seed and settings,
  for the shipped digits model and for a text-to-image artifact with a ControlNet, with one
  generation per row of a request and with requests sent at once (RELIABILITY #18);
* bad input is refused with the message `diffrt serve` gives, naming the field;
* the backend that ran is in every answer (RELIABILITY #15), the prompt text cut off at the
  encoder's length too (#13), and the per-stage times reach Triton's metrics endpoint;
* a stub that misreads this numpy's arrays is refused when the model loads, not per request;
* over gRPC, with Triton's own client (tritonclient[grpc], which needs protobuf 6 where the venv has 7:
  `make tritonclient` installs it in .venv/tritonserver/grpcclient and tests/scripts/triton_grpc_client.py
  runs it in a subprocess with that folder first on sys.path), the server is live and ready, the
  metadata lists the inputs the repository declares, answers equal the HTTP ones, refusals carry the
  HTTP message as INVALID_ARGUMENT, and requests whose gRPC deadline passed are not generated for nobody.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from types import SimpleNamespace
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")

from diffrt.cli import main  # noqa: E402
from diffrt.errors import DiffrtError  # noqa: E402
from diffrt.generate import GenerateRequest, generate  # noqa: E402
from diffrt.images import to_uint8  # noqa: E402
from diffrt.serve.batching import Answer  # noqa: E402
from diffrt.serve.schema import GenerateBody, RequestError  # noqa: E402
from diffrt.serve.triton import INPUTS, _parameters, bodies_from_inputs, check_row_shapes, outputs_from_answers, runtime_config  # noqa: E402
from diffrt.serve.triton_repo import RepositoryConfig, config_pbtxt, write_repository  # noqa: E402
from diffrt.serve.triton_server import LocalTritonServer, find_tritonserver  # noqa: E402

STEPS = 4
PROMPT = "a red cube"


# -- the repository and the request mapping, without a server ----------------------------------

def test_inputs_are_the_http_api_fields():
    # One schema for both front ends: a field added to the HTTP API and not to Triton's inputs fails here.
    assert set(INPUTS) == set(GenerateBody.model_fields)


def test_config_declares_what_the_model_takes(t2i_folder, t2i_artifact):
    def inputs(text: str) -> set[str]:
        return {line.split('"')[1] for line in text.splitlines() if "optional: true" in line}

    pixel = config_pbtxt(RepositoryConfig(), "", text_to_image=False, controlnet=False)
    assert "class_label" in inputs(pixel) and not {"prompt", "control_image", "image", "strength", "guidance_rescale"} & inputs(pixel)
    assert "truncated" not in pixel and "kind: KIND_CPU" in pixel and "max_batch_size: 8" in pixel
    t2i = config_pbtxt(RepositoryConfig(device="cuda", instances=2), "model", text_to_image=True, controlnet=True)
    assert {"prompt", "negative_prompt", "image", "strength", "control_image", "controlnet_conditioning_scale"} <= inputs(t2i)
    assert "class_label" not in inputs(t2i) and 'name: "truncated_negative"' in t2i and "count: 2 kind: KIND_GPU" in t2i
    plain = config_pbtxt(RepositoryConfig(), "model", text_to_image=True, controlnet=False)
    assert "control_image" not in inputs(plain)
    # The parameters read back as they were written, typed; a bad value is one line naming it.
    params = {}
    for line in t2i.splitlines():
        if line.startswith("parameters"):
            key, value = line.split('"')[1], json.loads(line.split("string_value: ")[1].rsplit(" } }", 1)[0])
            params[key] = {"string_value": value}
    typed = _parameters({"parameters": params})
    assert typed["model"] == "model" and typed["strict"] is False and typed["timeout_s"] == 60.0
    # --max-queue is Triton's queue alone; the runtime's holds one execute's rows (a parameter of an older repository: ignored).
    args = {"model_config": json.dumps({"max_batch_size": 4, "parameters": {**params, "max_queue": {"string_value": "2"}}}),
            "model_repository": "/r", "model_version": "1"}
    assert "max_queue" not in typed and runtime_config(args).max_queue == 4
    # Triton's queue (where requests wait: test_triton_holds_its_queue_to_max_queue) takes the same bounds.
    assert ("default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 60000000 max_queue_size: 64 }"
            in config_pbtxt(RepositoryConfig(), "", text_to_image=False, controlnet=False))
    with pytest.raises(DiffrtError, match="'strict' is 'maybe', not a bool"):
        _parameters({"parameters": {"strict": {"string_value": "maybe"}}})
    assert _parameters({"parameters": {"EXECUTION_ENV_PATH": {"string_value": "/env.tar.gz"}}}) == {}


def test_rows_become_requests_checked_like_the_http_api():
    bodies = bodies_from_inputs({
        "prompt": np.array([[b"a cat"], ["\u00e9t\u00e9".encode()]], dtype=object),
        "seed": np.array([[1], [2]], dtype=np.int64),
        "guidance_scale": np.array([[7.5], [0.3]], dtype=np.float64),
        "control_image": np.array([[b"\x89PNG-a", b"\x89PNG-b"], [b"\x89PNG-c", b"\x89PNG-d"]], dtype=object),
        "controlnet_conditioning_scale": np.array([[0.5], [1.5]], dtype=np.float64),
    })
    assert [b.prompt for b in bodies] == ["a cat", "\u00e9t\u00e9"] and [b.seed for b in bodies] == [1, 2]
    assert bodies[1].guidance_scale == 0.3  # FP64: the HTTP API's 0.3, not float32's 0.30000001
    assert [base64.b64decode(s) for s in bodies[0].control_image] == [b"\x89PNG-a", b"\x89PNG-b"]
    assert bodies[0].controlnet_conditioning_scale == 0.5
    assert bodies_from_inputs({}) == [GenerateBody()]  # every input optional: one request with the defaults
    with pytest.raises(RequestError, match="the inputs have 0 rows"):  # no answer of no rows (Triton refuses it first)
        bodies_from_inputs({"seed": np.zeros((0, 1), np.int64)})
    assert [b.scheduler for b in bodies_from_inputs({"scheduler": np.array([[b"lcm"], [b"ddim"]], dtype=object)})] == ["lcm", "ddim"]

    refusals = [
        ({"seed": np.array([[1], [2]]), "prompt": np.array([[b"x"]], dtype=object)}, "disagree on the batch dimension"),
        ({"prompt": np.array([[b"\xff\xfe"]], dtype=object)}, "prompt: not UTF-8"),
        ({"num_inference_steps": np.array([[0]])}, "num_inference_steps"),
        ({"seed": np.array([[1, 2]])}, "seed: one value per row, got 2"),
        ({"color": np.array([[b"red"]], dtype=object)}, "color"),
        ({"scheduler": np.array([[b"heun"]], dtype=object)}, "scheduler: Input should be 'ddim'"),
    ]
    for inputs, message in refusals:
        with pytest.raises(RequestError, match=message) as err:
            bodies_from_inputs(inputs)
        assert err.value.status == 422


def test_outputs_stack_rows_whose_plans_agree_on_shape():
    image = np.zeros((16, 16, 3), np.uint8)
    answers = [Answer("a", 1, [image, image], "onnxruntime", 4, {}, {"truncated": ["cut"], "truncated_negative": [None]}),
               Answer("b", 2, [image + 1, image + 1], "onnxruntime", 4, {}, None)]
    out = outputs_from_answers(answers, text_to_image=True)
    assert out["images"].shape == (2, 2, 16, 16, 3) and out["images"][1].max() == 1
    assert out["seed"].tolist() == [[1], [2]] and out["backend"].tolist() == [[b"onnxruntime"], [b"onnxruntime"]]
    assert out["truncated"].tolist() == [[b"cut"], [b""]] and out["truncated_negative"].tolist() == [[b""], [b""]]
    assert "truncated" not in outputs_from_answers(answers, text_to_image=False)

    # Rows answer in one tensor: their plans (sizes resolved, from a control image too) must agree, before any runs.
    plan = lambda n, h, w: SimpleNamespace(num_images=n, settings={"height": h, "width": w})  # noqa: E731
    check_row_shapes([plan(2, 16, 16), plan(2, 16, 16)])
    for other in (plan(1, 16, 16), plan(2, 32, 16)):
        with pytest.raises(RequestError, match="same num_images, height and width"):
            check_row_shapes([plan(2, 16, 16), other])


def test_the_rows_of_a_request_whose_client_has_gone_are_given_up(monkeypatch):
    """A gRPC deadline passed (or a cancelled call): Triton marks the request cancelled, and while
    the model waits for another request's rows it gives that one's up: a queued row is cancelled (it
    leaves the queue), a running one's deadline is now (its batch stops at the next step once no
    row of it is waited for); the request gets CANCELLED, the live one its images."""
    import threading
    import time

    import diffrt.serve.triton as triton
    from diffrt.serve.batcher import Job

    class Request:
        def __init__(self, cancelled: bool):
            self.cancelled = cancelled

        def is_cancelled(self) -> bool:
            return self.cancelled

    class TritonError:
        CANCELLED, INVALID_ARG, UNAVAILABLE = "CANCELLED", "INVALID_ARG", "UNAVAILABLE"

        def __init__(self, message: str, code: str = "INTERNAL"):
            self.message, self.code = message, code

    monkeypatch.setattr(triton, "CANCEL_POLL_S", 0.01)
    model = triton.TritonPythonModel()
    model.pb = SimpleNamespace(TritonError=TritonError, Tensor=lambda name, array: (name, array),
                               InferenceResponse=lambda output_tensors, error=None: SimpleNamespace(outputs=dict(output_tensors), error=error))
    model.runtime, model.text_to_image, model.stage_ms = SimpleNamespace(wait=lambda job: job.future.result(0)), False, None
    job = lambda: Job(None, 1, None, deadline=time.monotonic() + 30)  # noqa: E731
    live, gone = (Request(False), [job()]), (Request(True), [job(), job()])
    gone[1][0].future.set_running_or_notify_cancel()  # running: not cancellable, its deadline moves instead
    image = np.zeros((4, 4, 3), np.uint8)
    threading.Timer(0.2, lambda: live[1][0].future.set_result(Answer("a", 7, [image], "onnxruntime", 4, {}, None))).start()
    together = [(live[0], live[1]), (gone[0], gone[1])]
    answer = model._respond(live[1], live[0], together)
    assert answer.error is None and answer.outputs["seed"].tolist() == [[7]]
    assert gone[1][0].expired and not gone[1][0].future.cancelled() and gone[1][1].future.cancelled()
    refused = model._respond(gone[1], gone[0], together)
    assert refused.error.code == "CANCELLED" and "client cancelled the request" in refused.error.message
    assert triton._cancelled(object()) is False  # a stub without is_cancelled (Triton before 23.10): nothing given up

class FakeTritonStub:
    """The slice of Triton's stub API (triton_python_backend_utils) the model uses, for driving a real diffrt runtime
    in-process where no tritonserver runs; the requests and their answers as the stub hands them over."""

    class TritonError:
        INTERNAL, INVALID_ARG, UNAVAILABLE, CANCELLED = "INTERNAL", "INVALID_ARG", "UNAVAILABLE", "CANCELLED"

        def __init__(self, message: str, code: str = "INTERNAL"):
            self.message, self.code = message, code

    class Tensor:
        def __init__(self, name: str, array):
            self.name, self.array = name, np.asarray(array)

        def as_numpy(self):
            return self.array

        @classmethod
        def from_dlpack(cls, name: str, tensor):
            return cls(name, tensor.numpy())

    class InferenceResponse:
        def __init__(self, output_tensors: list, error=None):
            self.outputs, self.error = {t.name: t.array for t in output_tensors}, error

    @staticmethod
    def request(**inputs):
        return SimpleNamespace(inputs={k: FakeTritonStub.Tensor(k, np.array([[v] for v in values], dtype=np.int64))
                                       for k, values in inputs.items()}, is_cancelled=lambda: False)

    @staticmethod
    def get_input_tensor_by_name(request, name: str):
        return request.inputs.get(name)


@pytest.fixture
def in_process_model(tmp_path, monkeypatch):
    """A TritonPythonModel over the shipped digits model (eager PyTorch), initialised from the config.pbtxt
    write_repository wrote, as Triton's stub would; the runtime batches it ran are recorded (their sizes)."""
    import re

    import diffrt.serve.triton as triton

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", FakeTritonStub)
    path = write_repository(tmp_path / "repo", RepositoryConfig(name="digits", backend="torch", device="cpu", max_batch_size=8,
                                                                    exact_batching=False))  # batches whatever the backend
    text = (path / "config.pbtxt").read_text()
    inputs = [{"name": name} for name in re.findall(r'\{ name: "(\w+)" data_type: \w+ dims: \[[^\]]*\] optional', text)]
    params = {k: {"string_value": json.loads(v)} for k, v in re.findall(r'parameters \{ key: "(\w+)" value: \{ string_value: ("[^"]*") \} \}', text)}
    model = triton.TritonPythonModel()
    model.initialize({"model_config": json.dumps({"input": inputs, "max_batch_size": 8, "parameters": params}),
                      "model_repository": str(path), "model_version": "1", "model_instance_kind": "CPU", "model_name": "digits"})
    model.batches = []
    seen = model.runtime.batcher.on_batch
    model.runtime.batcher.on_batch = lambda jobs: (model.batches.append(len(jobs)), seen(jobs))
    yield model
    model.finalize()


def slow_planning(model, seconds: float = 0.02) -> None:
    """Each row's planning takes `seconds` (as decoding a control image does): longer than the runtime's batch window."""
    import time

    plan = model.runtime.worker.plan
    model.runtime.worker.plan = lambda body: (time.sleep(seconds), plan(body))[1]


def test_the_rows_triton_hands_over_run_as_one_batch(in_process_model):
    """From a review: rows were queued as each was planned, and the runtime's 1 ms window closed before the later
    ones came (a batch of 8 ran as 1 + 7, the first request alone); all are planned first now, then queued together."""
    model = in_process_model
    slow_planning(model)
    answers = model.execute([FakeTritonStub.request(class_label=[i], seed=[i], num_inference_steps=[2]) for i in range(8)])
    assert [a.error for a in answers] == [None] * 8 and model.batches == [8]
    assert [int(a.outputs["seed"][0, 0]) for a in answers] == list(range(8))


def test_a_refused_request_runs_none_of_its_rows(in_process_model):
    """From a review: the rows of a request refused for their shapes were queued before the check, and ran for
    nobody ahead of live requests (a future's cancel cannot stop a running row)."""
    model = in_process_model
    slow_planning(model)
    refused, live = model.execute([FakeTritonStub.request(class_label=[1, 2, 3], num_inference_steps=[50] * 3, num_images=[1, 1, 2]),
                                   FakeTritonStub.request(class_label=[4], num_inference_steps=[2])])
    assert refused.error.code == "INVALID_ARG" and "same num_images, height and width" in refused.error.message
    assert live.error is None and model.batches == [1]  # the live request's row alone ran
    assert model.runtime.batcher.in_flight == 0


def test_a_dead_runtime_refuses_requests_and_ends_its_stub(in_process_model, monkeypatch):
    """From a review: an engine failing every batch (a CUDA error sticks to the process) left the Triton model READY,
    failing each request with INTERNAL. Once the runtime counts as dead, requests are refused with why (UNAVAILABLE),
    and the stub process ends once they are answered, so Triton marks the instance not ready, or restarts it."""
    import threading

    import diffrt.serve.triton as triton
    from diffrt.serve.batcher import FAILING_BATCHES

    model = in_process_model
    ended = threading.Event()
    monkeypatch.setattr(triton, "END_GRACE_S", 0.01)
    monkeypatch.setattr(model, "_end_process", ended.set)

    def broken(jobs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(model.runtime.worker, "run_batch", broken)
    for _ in range(FAILING_BATCHES):
        (answer,) = model.execute([FakeTritonStub.request(class_label=[1], num_inference_steps=[2])])
        assert answer.error.code == "INTERNAL" and not ended.is_set()
    assert not model.runtime.alive
    answers = model.execute([FakeTritonStub.request(class_label=[1]), FakeTritonStub.request(class_label=[2])])
    assert [a.error.code for a in answers] == ["UNAVAILABLE"] * 2 and model.batches == [1] * FAILING_BATCHES
    assert "illegal memory access" in answers[0].error.message and "restarting" in answers[0].error.message
    assert ended.wait(5)


def test_write_repository_places_the_model_atomically(t2i_artifact, tmp_path, monkeypatch):
    import diffrt.serve.triton_repo as triton_repo

    repo = tmp_path / "repo"
    path = write_repository(repo, RepositoryConfig(model=str(t2i_artifact), name="sd"))
    assert sorted(p.name for p in path.iterdir()) == ["1", "config.pbtxt"]
    placed = path / "1" / "model"
    for source in t2i_artifact.rglob("*"):
        if source.is_file():  # hard links on one filesystem: no second copy of the weights
            assert (placed / source.relative_to(t2i_artifact)).stat().st_ino == source.stat().st_ino
    assert "from diffrt.serve.triton import TritonPythonModel" in (path / "1" / "model.py").read_text()
    assert 'string_value: "model"' in (path / "config.pbtxt").read_text()

    with pytest.raises(DiffrtError, match="already exists"):
        write_repository(repo, RepositoryConfig(model=str(t2i_artifact), name="sd"))
    with pytest.raises(DiffrtError, match="--name"):
        write_repository(repo, RepositoryConfig(name="../escape"))
    linked = write_repository(repo, RepositoryConfig(model=str(t2i_artifact), name="linked", link=True))
    assert not (linked / "1" / "model").exists() and str(t2i_artifact.resolve()) in (linked / "config.pbtxt").read_text()

    def fail(src, dst):
        (dst / "half").mkdir(parents=True)
        raise OSError("disk full")

    monkeypatch.setattr(triton_repo, "_place", fail)
    with pytest.raises(OSError, match="disk full"):
        write_repository(repo, RepositoryConfig(model=str(t2i_artifact), name="broken"))
    assert sorted(p.name for p in repo.iterdir()) == ["linked", "sd"]  # nothing half-written, no temp folder left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_a_killed_write_leaves_nothing_triton_would_load(tmp_path, monkeypatch):
    """From a review: the model folder was staged inside the repository, and a run killed mid-copy (SIGKILL: no cleanup
    runs) left a folder there that Triton tried to load as a model, failing the server's start. It is staged beside the
    repository now; one left in a repository (staged there when its parent is another filesystem) is refused by name."""
    import subprocess
    import textwrap

    import diffrt.serve.triton_repo as triton_repo
    from diffrt.models import SHIPPED_DIGITS

    repo = tmp_path / "models"
    write_repository(repo, RepositoryConfig(name="digits", backend="torch", device="cpu"))
    killed = textwrap.dedent(f"""
        import os, signal
        import diffrt.serve.triton_repo as triton_repo
        def place(src, dst):
            (dst / "unet").mkdir(parents=True)
            os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer, mid-copy
        triton_repo._place = place
        triton_repo.write_repository({str(repo)!r}, triton_repo.RepositoryConfig(model={str(SHIPPED_DIGITS)!r}, name="sd", backend="torch", device="cpu"))
    """)
    assert subprocess.run([sys.executable, "-c", killed]).returncode == -9
    assert sorted(p.name for p in repo.iterdir()) == ["digits"]
    (left,) = [p for p in tmp_path.iterdir() if p.name != "models"]  # beside it, where Triton does not look
    assert left.name.startswith(".models.sd.tmp-")

    # A repository whose parent is another filesystem (a mounted volume) stages inside it: a leftover there is named.
    with monkeypatch.context() as patch:  # the parent not writable: the same fallback
        patch.setattr(triton_repo.os, "access", lambda path, mode: False)
        assert triton_repo._staging_place(repo, "sd") == (repo, ".sd.tmp-")
    import errno

    def cross_device(src, dst):  # a bind mount (a Kubernetes subPath): one device, and still no rename across it
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    with monkeypatch.context() as patch:
        patch.setattr(triton_repo.os, "rename", cross_device)
        assert triton_repo._staging_place(repo, "sd") == (repo, ".sd.tmp-")
    assert sorted(p.name for p in repo.iterdir()) == ["digits"] and len(list(tmp_path.iterdir())) == 2  # no probe left
    (repo / ".sd.tmp-0a1b2c3d").mkdir()
    with pytest.raises(DiffrtError, match=r"\.sd\.tmp-0a1b2c3d is a folder an interrupted `diffrt triton-repo` left"):
        write_repository(repo, RepositoryConfig(name="other", backend="torch", device="cpu"))
    assert not (repo / "other").exists()


def test_settings_triton_would_misread_are_refused(tmp_path):
    """From a review: each of these wrote a repository that could never serve: TensorRT on CPU instances failed every
    load, a timeout under a microsecond became 0 (Triton's 'no timeout'), a queue past 32 bits did not parse."""
    for config, message in [(RepositoryConfig(backend="tensorrt", device="cpu"), "--backend tensorrt runs on a CUDA device"),
                            (RepositoryConfig(timeout_s=4e-7, device="cpu"), "at least 1 microsecond"),
                            (RepositoryConfig(max_queue=2**32, device="cpu"), "holds at most 4294967295 requests")]:
        with pytest.raises(DiffrtError, match=message):
            write_repository(tmp_path / "repo", config)
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_a_repository_is_readable_as_the_umask_allows(tmp_path):
    """Staged in a temporary folder and renamed into place: not tempfile.mkdtemp's 0700, since the
    server often runs as another user than the one who wrote the repository."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = write_repository(tmp_path / "repo", RepositoryConfig(name="digits"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755


def test_paths_the_stub_cannot_name_are_refused(tmp_path, monkeypatch):
    # Triton's Python stub runs with an ascii filesystem encoding whatever the locale: a path with
    # "\u00ef" in it is a one-line refusal, not "model folder not found".
    import shutil

    from diffrt.models import SHIPPED_DIGITS
    from diffrt.serve.triton import runtime_config

    elsewhere = shutil.copytree(SHIPPED_DIGITS, tmp_path / "d\u00efgits")
    with pytest.raises(DiffrtError, match="names files in ASCII only"):
        write_repository(tmp_path / "repo", RepositoryConfig(model=str(elsewhere), link=True))
    assert not (tmp_path / "repo" / "diffrt").exists()
    repo = write_repository(tmp_path / "r\u00e9po", RepositoryConfig(model=str(elsewhere), backend="torch"))  # placed: fine to write
    args = {"model_config": json.dumps({"max_batch_size": 8, "parameters": {"model": {"string_value": "model"}}}),
            "model_repository": str(repo), "model_version": "1"}
    monkeypatch.setattr("sys.getfilesystemencoding", lambda: "ascii")
    with pytest.raises(DiffrtError, match="move the model repository to an ASCII path"):
        runtime_config(args)


def test_cli_writes_a_repository(tmp_path, capsys):
    assert main(["triton-repo", "--out", str(tmp_path / "repo"), "--backend", "torch", "--device", "cpu"]) == 0
    assert "tritonserver --model-repository" in capsys.readouterr().out
    assert 'string_value: "torch"' in (tmp_path / "repo" / "diffrt" / "config.pbtxt").read_text()
    assert main(["triton-repo", "--out", str(tmp_path / "repo"), "--backend", "torch"]) == 2
    assert "already exists" in capsys.readouterr().err
    # For a serving machine with TensorRT, written on one without (the bug: "backend 'tensorrt' is not available").
    assert main(["triton-repo", "--out", str(tmp_path / "trt"), "--backend", "tensorrt"]) == 0
    config = (tmp_path / "trt" / "diffrt" / "config.pbtxt").read_text()
    assert 'string_value: "tensorrt"' in config and "kind: KIND_GPU" in config
    assert main(["triton-repo", "--out", str(tmp_path / "x"), "--backend", "tensorrtt"]) == 2
    assert "unknown backend 'tensorrtt'" in capsys.readouterr().err


def test_an_onnx_artifact_is_not_written_for_tensorrt(classemb_model_dir, tmp_path, capsys):
    """From a review: a repository for TensorRT over an artifact exported for ONNX Runtime only was written without a
    word, and every instance of it would fail to load on the serving machine ("no TensorRT engine for unet")."""
    from diffrt.export.artifact import export_pixel_model
    from diffrt.export.options import ExportOptions

    artifact = export_pixel_model(classemb_model_dir, tmp_path / "art", ExportOptions(batch=(1, 2, 4), verify=False)).folder
    assert main(["triton-repo", "--model", str(artifact), "--out", str(tmp_path / "repo"), "--backend", "tensorrt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffrt: error: --backend tensorrt: ") and "has no TensorRT engine for unet" in err
    assert not (tmp_path / "repo").exists()
    assert main(["triton-repo", "--model", str(artifact), "--out", str(tmp_path / "repo"), "--backend", "onnxruntime"]) == 0


# -- a real tritonserver -------------------------------------------------------------------------

def start_triton(repo: Path, **kwargs) -> LocalTritonServer:
    if find_tritonserver() is None:
        pytest.skip("no tritonserver (`make tritonserver` puts one in the venv on Linux x86_64)")
    return LocalTritonServer(repo, env={"OMP_NUM_THREADS": "1"}, **kwargs).start()


def infer(server: LocalTritonServer, model: str, inputs: dict[str, list], timeout: float = 120) -> httpx.Response:
    """KServe v2 over HTTP (outputs as JSON: BYTES come back as text): every input one row (or len(values) rows for a list of lists). BYTES go
    as binary tensor data (Triton's extension: 4-byte length + bytes each), the rest as JSON."""
    header, blobs = {"inputs": [], "outputs": []}, []
    for name, rows in inputs.items():
        rows = rows if isinstance(rows, list) else [[rows]]
        kind = INPUTS[name][0]
        entry = {"name": name, "shape": [len(rows), len(rows[0])]}
        if kind == "TYPE_STRING":
            blob = b"".join(struct.pack("<I", len(v)) + v for row in rows for v in (x if isinstance(x, bytes) else x.encode() for x in row))
            entry.update(datatype="BYTES", parameters={"binary_data_size": len(blob)})
            blobs.append(blob)
        else:
            entry.update(datatype=GRPC_TYPES[kind], data=[v for row in rows for v in row])
        header["inputs"].append(entry)
    body = json.dumps(header).encode()
    return httpx.post(f"{server.url}/v2/models/{model}/infer", content=body + b"".join(blobs),
                      headers={"Inference-Header-Content-Length": str(len(body))}, timeout=timeout)


def outputs(response: httpx.Response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    out = {}
    for o in response.json()["outputs"]:
        dtype = {"UINT8": np.uint8, "INT64": np.int64, "BYTES": object}[o["datatype"]]
        out[o["name"]] = np.array(o["data"], dtype=dtype).reshape(o["shape"])
    return out


def generated(model, **fields) -> np.ndarray:
    """`diffrt generate`'s images for the same request, as uint8 [N, H, W, C]."""
    fields = {"num_inference_steps": STEPS, **fields}
    return to_uint8(generate(GenerateRequest(model=model, backend="onnxruntime", device="cpu", **fields)).images)


@pytest.fixture(scope="module")
def triton(t2i_artifact, tmp_path_factory):
    """One server, three models: the shipped digits model, the text-to-image artifact (ControlNet),
    and a copy of the digits model named in place (`link`) at a path config.pbtxt must escape
    (Triton's stub names files in ASCII only: test_paths_the_stub_cannot_name_are_refused)."""
    import shutil

    from diffrt.models import SHIPPED_DIGITS

    repo = tmp_path_factory.mktemp("triton") / "repo"
    write_repository(repo, RepositoryConfig(name="digits", max_batch_size=4, queue_delay_ms=200))
    write_repository(repo, RepositoryConfig(model=str(t2i_artifact), name="sd", max_batch_size=2))
    elsewhere = shutil.copytree(SHIPPED_DIGITS, repo.parent / 'digits "copy" \\ 1')
    write_repository(repo, RepositoryConfig(model=str(elsewhere), name="linked", link=True))
    write_repository(repo, RepositoryConfig(name="tight", max_batch_size=1, max_queue=1, queue_delay_ms=0))
    server = start_triton(repo)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_digits_over_kserve_equal_diffrt_generate(triton):
    settings = dict(seed=1234, num_inference_steps=STEPS, guidance_scale=2.5, eta=0.5, color="#ff8800", color_scale=4.0)
    out = outputs(infer(triton, "digits", {"class_label": 3, **settings}))
    assert out["images"].shape == (1, 1, 16, 16, 3) and out["seed"].tolist() == [[1234]]
    assert out["backend"].tolist() == [["onnxruntime"]]  # RELIABILITY #15
    np.testing.assert_array_equal(out["images"][0], generated(None, class_label=3, **settings))

    # Two generations in one request, one per row; num_images 2 from one seed.
    out = outputs(infer(triton, "digits", {"class_label": [[1], [7]], "seed": [[5], [6]], "num_inference_steps": [[STEPS]] * 2,
                                           "num_images": [[2], [2]]}))
    assert out["images"].shape == (2, 2, 16, 16, 3)
    for row, (label, seed) in enumerate([(1, 5), (7, 6)]):
        np.testing.assert_array_equal(out["images"][row], generated(None, class_label=label, seed=seed, num_images=2))

    # The sampler per request: LCM on the digits model's DDIM schedule, as `diffrt generate --scheduler lcm`.
    out = outputs(infer(triton, "digits", {"class_label": 5, "seed": 9, "num_inference_steps": STEPS, "scheduler": "lcm"}))
    np.testing.assert_array_equal(out["images"][0], generated(None, class_label=5, seed=9, scheduler="lcm"))


def test_a_model_named_in_place_at_an_awkward_path(triton):
    out = outputs(infer(triton, "linked", {"class_label": 4, "seed": 8, "num_inference_steps": STEPS}))
    np.testing.assert_array_equal(out["images"][0], generated(None, class_label=4, seed=8))


def test_requests_sent_at_once_each_get_their_own_images(triton):
    # RELIABILITY #18: Triton's dynamic batcher hands them to one execute, the runtime batches
    # them; every answer is still its own seed's image.
    requests = [(label, 100 + label) for label in range(6)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda r: infer(triton, "digits", {"class_label": r[0], "seed": r[1], "num_inference_steps": STEPS}),
                                requests))
    for (label, seed), response in zip(requests, answers):
        np.testing.assert_array_equal(outputs(response)["images"][0], generated(None, class_label=label, seed=seed))
    stats = httpx.get(f"{triton.url}/v2/models/digits/stats").json()["model_stats"][0]
    assert stats["execution_count"] < stats["inference_count"]  # Triton handed the model several requests per call


def test_triton_holds_its_queue_to_max_queue(triton):
    """From a review: an execute gets at most max_batch_size rows, so requests waited in Triton's own queue, unbounded
    and untimed: --max-queue and --timeout did nothing (10 requests to a queue of 2 all answered, after up to 5x the
    timeout). config.pbtxt's queue policy now refuses those past the queue at once."""
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda seed: infer(triton, "tight", {"class_label": 1, "seed": seed, "num_inference_steps": 50}),
                                range(6)))
    codes = sorted(r.status_code for r in answers)
    assert 200 in codes and 503 in codes, [(r.status_code, r.text[:80]) for r in answers]
    assert all("Exceeds maximum queue size" in r.json()["error"] for r in answers if r.status_code == 503)


def test_bad_requests_are_refused_by_name(triton):
    cases = [({"class_label": 33}, "class_label: 33 is out of range"),
             ({"num_inference_steps": 0}, "num_inference_steps"),
             ({"prompt": "a cat"}, "prompt"),  # not an input of a pixel model: Triton itself refuses it
             ({"class_label": 1, "height": 17}, "height"),
             ({"class_label": 1, "scheduler": "heun"}, "scheduler: Input should be 'ddim'"),
             ({"class_label": 1, "scheduler": "lcm", "eta": 0.5}, "eta: eta 0.5 is DDIM's"),
             ({"class_label": [[1], [2]], "num_images": [[1], [2]]}, "same num_images, height and width")]
    for inputs, message in cases:
        r = infer(triton, "digits", inputs)
        assert r.status_code == 400 and message in r.json()["error"], (inputs, r.text)
    assert outputs(infer(triton, "digits", {"class_label": 2, "num_inference_steps": 1}))["images"].shape[0] == 1  # still serving


def test_text_to_image_with_a_controlnet_equals_diffrt_generate(triton, t2i_artifact, tmp_path):
    from PIL import Image

    control = tmp_path / "control.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(control)
    png = control.read_bytes()
    out = outputs(infer(triton, "sd", {"prompt": PROMPT, "negative_prompt": "blurry", "seed": 3, "num_inference_steps": STEPS,
                                       "control_image": [[png]], "controlnet_conditioning_scale": 0.7}))
    want = generated(str(t2i_artifact), prompt=PROMPT, negative_prompt="blurry", seed=3, control_image=str(control),
                     control_scale=0.7)
    np.testing.assert_array_equal(out["images"][0], want)
    assert out["truncated"].tolist() == [[""]]

    # Image-to-image from raw PNG bytes, with the control image (diffusers' default scale there, 0.8).
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(init)
    out = outputs(infer(triton, "sd", {"prompt": PROMPT, "seed": 5, "num_inference_steps": STEPS, "image": [[init.read_bytes()]],
                                       "strength": 0.6, "control_image": [[png]]}))
    np.testing.assert_array_equal(out["images"][0], generated(str(t2i_artifact), prompt=PROMPT, seed=5, image=str(init), strength=0.6,
                                                              control_image=str(control)))

    # RELIABILITY #13: the text cut off at the encoder's 77 tokens comes back with the images.
    long_prompt = " ".join(f"word{i}" for i in range(60))
    out = outputs(infer(triton, "sd", {"prompt": long_prompt, "seed": 1, "num_inference_steps": 1}))
    assert out["truncated"][0, 0].replace(" ", "").endswith("word59")

    # Per-stage times reach Triton's metrics endpoint beside its own.
    text = httpx.get(triton.metrics_url).text
    for stage in ("text_encoder", "unet_controlnet", "vae_decoder"):
        line = next(line for line in text.splitlines()
                    if line.startswith("diffrt_stage_milliseconds_total{") and f'stage="{stage}"' in line and 'model="sd"' in line)
        assert float(line.split()[-1]) > 0
    assert any(line.startswith("diffrt_images_total{") and 'model="sd"' in line for line in text.splitlines())



# -- the same server over gRPC (tritonclient.grpc, in a subprocess: it needs protobuf 6, the venv has 7) --

GRPC_CLIENT = Path(sys.prefix) / "tritonserver" / "grpcclient"  # `make tritonclient`
GRPC_TYPES = {"TYPE_STRING": "BYTES", "TYPE_INT64": "INT64", "TYPE_FP64": "FP64", "TYPE_BOOL": "BOOL"}


def grpc_inputs(inputs: dict[str, list]) -> list[dict]:
    """infer()'s inputs as the gRPC script's tensors: the same rows and data types, BYTES as base64."""
    tensors = []
    for name, rows in inputs.items():
        rows = rows if isinstance(rows, list) else [[rows]]
        datatype = GRPC_TYPES[INPUTS[name][0]]
        data = [v for row in rows for v in row]
        if datatype == "BYTES":
            data = [base64.b64encode(v if isinstance(v, bytes) else v.encode()).decode("ascii") for v in data]
        tensors.append({"name": name, "datatype": datatype, "shape": [len(rows), len(rows[0])], "data": data})
    return tensors


def over_grpc(server: LocalTritonServer, models: list[str], requests: dict[str, tuple[str, list[dict]]], out: Path,
              abandon: dict | None = None) -> dict:
    """Run tests/scripts/triton_grpc_client.py against the server: its results.json, numeric outputs loaded from their npy."""
    import subprocess

    out.mkdir(parents=True, exist_ok=True)
    plan = {"url": f"127.0.0.1:{server.grpc}", "models": models,
            "requests": {key: {"model": model, "inputs": tensors} for key, (model, tensors) in requests.items()},
            **({"abandon": abandon} if abandon else {})}
    (out / "plan.json").write_text(json.dumps(plan))
    script = Path(__file__).parent / "scripts" / "triton_grpc_client.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(script), str(GRPC_CLIENT), str(out / "plan.json"), str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((out / "results.json").read_text())
    for answer in results["requests"].values():
        for output in answer.get("outputs", {}).values():
            output["array"] = (np.load(out / output["file"]) if "file" in output
                               else np.array(output["data"], dtype=object).reshape(output["shape"]))
    return results


@pytest.mark.skipif(not (GRPC_CLIENT / "tritonclient" / "grpc").is_dir(),  # checked before the server starts
                    reason=f"no Triton gRPC client in {GRPC_CLIENT} (`make tritonclient` installs tritonclient[grpc] with protobuf 6 there)")
def test_grpc_answers_as_http_does(triton, t2i_artifact, tmp_path):
    """Triton's gRPC front end, with its own client: health, readiness and the inputs the repository
    declares; images equal to the HTTP answer's (and `diffrt generate`'s) for the same request;
    refusals with the HTTP path's message."""
    from PIL import Image

    from diffrt.serve.triton import CONTROL_ONLY, PIXEL_ONLY, TEXT_ONLY

    rng = np.random.default_rng(0)
    control, init = (Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2))
    control.save(tmp_path / "control.png")
    init.save(tmp_path / "init.png")
    png, init_png = (tmp_path / "control.png").read_bytes(), (tmp_path / "init.png").read_bytes()
    digits_settings = dict(class_label=3, seed=1234, num_inference_steps=STEPS, guidance_scale=2.5, eta=0.5, color="#ff8800",
                           color_scale=4.0)
    good = {
        "digits": ("digits", digits_settings),
        "digits_rows": ("digits", {"class_label": [[1], [7]], "seed": [[5], [6]], "num_inference_steps": [[STEPS]] * 2,
                                   "num_images": [[2], [2]]}),
        "digits_lcm": ("digits", {"class_label": 5, "seed": 9, "num_inference_steps": STEPS, "scheduler": "lcm"}),
        "sd_control": ("sd", {"prompt": PROMPT, "negative_prompt": "blurry", "seed": 3, "num_inference_steps": STEPS,
                              "control_image": [[png]], "controlnet_conditioning_scale": 0.7}),
        "sd_image": ("sd", {"prompt": PROMPT, "seed": 5, "num_inference_steps": STEPS, "image": [[init_png]], "strength": 0.6,
                            "control_image": [[png]]}),
        "sd_long": ("sd", {"prompt": " ".join(f"word{i}" for i in range(60)), "seed": 1, "num_inference_steps": 1}),
    }
    bad = {f"bad{i}": ("digits", inputs) for i, inputs in enumerate([
        {"class_label": 33}, {"num_inference_steps": 0}, {"prompt": "a cat"}, {"class_label": 1, "height": 17},
        {"class_label": 1, "scheduler": "heun"}, {"class_label": 1, "scheduler": "lcm", "eta": 0.5},
        {"class_label": [[1], [2]], "num_images": [[1], [2]]}, {"image": [[b"not a png"]], "prompt": PROMPT}])}
    bad["bad7"] = ("sd", bad["bad7"][1])
    requests = {key: (model, grpc_inputs(inputs)) for key, (model, inputs) in {**good, **bad}.items()}
    # A float32 guidance scale (numpy's default for many clients): refused by Triton for the FP64 the model declares.
    requests["fp32"] = ("digits", [{**t, "datatype": "FP32"} if t["name"] == "guidance_scale" else t for t in requests["digits"][1]])
    # Four requests whose 0.5 s gRPC deadline passes while they run or wait: Triton marks them
    # cancelled, and the model gives their rows up (a running batch at its next step) rather than
    # generating them for nobody ahead of the next request.
    steps = lambda n: grpc_inputs({"class_label": 1, "num_inference_steps": n})  # noqa: E731
    abandon = {"model": "digits", "alone": steps(200), "abandoned": [steps(n) for n in (200, 199, 198, 197)],
               "client_timeout": 0.5, "after": steps(2)}
    results = over_grpc(triton, ["digits", "sd"], requests, tmp_path / "grpc", abandon)

    assert results["protobuf"].startswith("6.") and str(GRPC_CLIENT) in results["protobuf_file"]
    assert results["server_live"] and results["server_ready"] and results["model_ready"] == {"digits": True, "sd": True}
    for model, leave_out, outputs_declared in [
            ("digits", TEXT_ONLY + CONTROL_ONLY, ["images", "seed", "backend"]),
            ("sd", PIXEL_ONLY, ["images", "seed", "backend", "truncated", "truncated_negative"])]:
        meta = results["metadata"][model]
        assert meta["name"] == model and meta["platform"] == "python" and meta["versions"] == ["1"]
        want = [{"name": name, "datatype": GRPC_TYPES[kind], "shape": [-1, *dims]}
                for name, (kind, dims) in INPUTS.items() if name not in leave_out]
        assert [{**i, "shape": [int(d) for d in i["shape"]]} for i in meta["inputs"]] == want  # protobuf's JSON: int64 as text
        assert [o["name"] for o in meta["outputs"]] == outputs_declared
        assert [int(d) for d in meta["outputs"][0]["shape"]] == [-1, -1, -1, -1, -1] and meta["outputs"][0]["datatype"] == "UINT8"
        config = results["config"][model]
        assert all(i.get("optional") for i in config["input"]) and int(config["max_batch_size"]) == (4 if model == "digits" else 2)

    answers = results["requests"]
    for key, (model, inputs) in good.items():
        assert "error" not in answers[key], (key, answers[key])
        grpc_out = {name: o["array"] for name, o in answers[key]["outputs"].items()}
        http_out = outputs(infer(triton, model, inputs))
        assert set(grpc_out) == set(http_out), key
        np.testing.assert_array_equal(grpc_out["images"], http_out["images"], err_msg=key)
        assert grpc_out["images"].dtype == np.uint8 and grpc_out["seed"].tolist() == http_out["seed"].tolist(), key
        for name in set(grpc_out) - {"images", "seed"}:  # BYTES: the backend, the text cut off
            assert grpc_out[name].tolist() == http_out[name].tolist(), (key, name)
    digits = {name: o["array"] for name, o in answers["digits"]["outputs"].items()}
    np.testing.assert_array_equal(digits["images"][0], generated(None, **digits_settings))
    assert digits["backend"].tolist() == [["onnxruntime"]] and digits["seed"].tolist() == [[1234]]
    assert answers["sd_long"]["outputs"]["truncated"]["array"][0, 0].replace(" ", "").endswith("word59")

    for key, (model, inputs) in bad.items():
        http = infer(triton, model, inputs)
        assert http.status_code == 400, (key, http.text)
        assert answers[key] == {"error": http.json()["error"], "status": "StatusCode.INVALID_ARGUMENT"}, (key, http.text)
    assert answers["bad0"]["error"].startswith("class_label: 33 is out of range")
    assert answers["fp32"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "guidance_scale" in answers["fp32"]["error"] and "FP64" in answers["fp32"]["error"], answers["fp32"]

    gone = results["abandon"]
    assert gone["statuses"] == ["StatusCode.DEADLINE_EXCEEDED"] * 4
    assert gone["after_s"] < 0.5 * gone["alone_s"], gone  # not behind 4 x 200 steps that nobody waits for
    assert outputs(infer(triton, "digits", {"class_label": 2, "num_inference_steps": 1}))["images"].shape[0] == 1  # still serving

def test_a_stub_that_misreads_numpy_arrays_is_refused_at_load(tmp_path):
    import numpy

    if int(numpy.__version__.split(".")[0]) < 2:
        pytest.skip("the stub's own numpy: nothing to mismatch")
    repo = tmp_path / "repo"
    write_repository(repo, RepositoryConfig(backend="torch"))
    server = start_triton(repo, numpy_path="")  # the venv's numpy 2 only
    try:
        server.proc.wait(300)  # the only model fails to load: the server exits
    finally:
        server.stop()
    log = server.log_text()
    assert f"misreads numpy {numpy.__version__} arrays" in log and "numpy<2" in log, server.tail()
