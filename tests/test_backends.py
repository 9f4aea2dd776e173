"""Backend plumbing that runs without a GPU: which device a backend gets, and the bookkeeping of the
TensorRT backend's CUDA graphs (one execution context per captured shape) over fake TensorRT objects.
The real engines are exercised by the `gpu` tests in test_tensorrt.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from diffrt.errors import BackendUnavailableError
from diffrt.runtime import backends
from diffrt.runtime.backends import default_device, resolve_device


@pytest.fixture
def cuda(monkeypatch):
    """Pretend torch sees (True) or does not see (False) a GPU."""
    def set_cuda(available: bool, onnxruntime_cuda: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(backends, "_onnxruntime_has_cuda", lambda: onnxruntime_cuda)
    return set_cuda


def test_no_device_means_cuda_when_available(cuda):
    cuda(True)
    assert resolve_device(None, "torch") == torch.device("cuda")
    assert resolve_device(None, "tensorrt") == torch.device("cuda")
    assert resolve_device(None, "onnxruntime") == torch.device("cuda")
    assert resolve_device("cpu", "torch") == torch.device("cpu")  # an explicit device wins
    cuda(True, onnxruntime_cuda=False)  # a CPU-only ONNX Runtime build on a GPU machine stays on the CPU
    assert default_device("onnxruntime") == torch.device("cpu") and default_device("torch") == torch.device("cuda")
    cuda(False)
    assert resolve_device(None, "torch") == resolve_device(None, "onnxruntime") == torch.device("cpu")


def test_tensorrt_needs_cuda_and_says_so_in_one_line(cuda):
    cuda(True)
    with pytest.raises(BackendUnavailableError, match=r"runs on a CUDA device, not cpu; pass --device cuda") as info:
        resolve_device("cpu", "tensorrt")
    assert "\n" not in str(info.value)
    cuda(False)
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU and torch sees none"):
        resolve_device(None, "tensorrt")


def test_tensorrt_on_the_cpu_fails_before_any_export(uncond_model_dir, cuda, monkeypatch):
    # The bug: --device defaulted to cpu, so `generate --backend tensorrt` built an engine and only then failed.
    from diffrt.export import artifact
    from diffrt.runtime import loading

    cuda(True)
    monkeypatch.setattr(loading, "require_backend", lambda name: None)  # as if TensorRT were installed

    def no_export(*args, **kwargs):
        raise AssertionError("an engine was built for a device TensorRT cannot run on")

    monkeypatch.setattr(artifact, "export_pixel_model", no_export)
    with pytest.raises(BackendUnavailableError, match="runs on a CUDA device"):
        loading.open_pixel_pipeline(uncond_model_dir, "tensorrt", "cpu")


def test_serve_resolves_the_device_before_loading(cuda):
    from diffrt.serve.runtime import RuntimeConfig, make_worker

    cuda(False)
    assert make_worker(RuntimeConfig(backend="onnxruntime")).device == "cpu"
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU"):
        make_worker(RuntimeConfig(backend="tensorrt"))


# --- TensorRT CUDA graphs: one context per shape key, sharing one block of activation memory ---------------


class FakeContext:
    def __init__(self, with_setter: bool):
        self.memory = None
        if with_setter:
            self.set_device_memory = lambda ptr, size: setattr(self, "memory", (ptr, size))


def fake_backend(with_setter: bool = True):
    from diffrt.runtime.backends.tensorrt import TensorRTBackend

    made = []

    def create_execution_context(strategy):
        made.append(strategy)
        return FakeContext(with_setter)

    backend = object.__new__(TensorRTBackend)  # no engine file: only the graph bookkeeping is under test
    backend.device = torch.device("cpu")
    backend.spec = SimpleNamespace(name="unet")
    backend._trt = SimpleNamespace(ExecutionContextAllocationStrategy=SimpleNamespace(USER_MANAGED="user-managed"))
    backend.engine = SimpleNamespace(device_memory_size_v2=4096, create_execution_context=create_execution_context)
    backend._graphs, backend._graph_memory = {}, None
    return backend, made


@pytest.mark.parametrize("with_setter", [True, False], ids=["set_device_memory", "device_memory"])
def test_graph_contexts_are_user_managed_on_one_shared_block(with_setter):
    backend, made = fake_backend(with_setter)
    a, b = backend._graph_context(), backend._graph_context()
    assert a is not b and made == ["user-managed", "user-managed"]
    ptr = backend._graph_memory.data_ptr()
    assert backend._graph_memory.numel() == 4096
    assert (a.memory, b.memory) == (((ptr, 4096),) * 2 if with_setter else (None, None))
    if not with_setter:
        assert a.device_memory == b.device_memory == ptr


def test_each_shape_replays_its_own_graph_and_later_shapes_run_plainly(monkeypatch):
    from diffrt.runtime.backends import tensorrt as trt_backend

    backend, _ = fake_backend()
    captured, replayed, executed = [], [], []

    def capture(inputs):
        shape = tuple(inputs["sample"].shape)
        captured.append(shape)
        graph = SimpleNamespace(replay=lambda: replayed.append(shape))
        static_in = {n: t.clone() for n, t in inputs.items()}
        return trt_backend._Graph(context=f"context for {shape}", inputs=static_in,
                                  outputs={"noise_pred": torch.full(shape, float(shape[0]))}, graph=graph)

    monkeypatch.setattr(backend, "_capture", capture)
    monkeypatch.setattr(backend, "_execute", lambda inputs: executed.append(tuple(inputs["sample"].shape)) or {})
    monkeypatch.setattr(trt_backend, "MAX_GRAPHS", 2)
    feeds = [{"sample": torch.full((b, 3, 8, 8), float(i))} for i, b in enumerate((1, 2, 1, 4, 2))]
    assert not backend.replays_graphs  # asked for, none captured yet
    outs = [backend._run_graph(feed) for feed in feeds]
    assert backend.replays_graphs
    assert captured == [(1, 3, 8, 8), (2, 3, 8, 8)]  # each key once; the third key is over MAX_GRAPHS
    assert replayed == [(1, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8), (2, 3, 8, 8)] and executed == [(4, 3, 8, 8)]
    graph_1 = backend._graphs[(("sample", (1, 3, 8, 8)),)]
    assert graph_1.context == "context for (1, 3, 8, 8)"
    assert torch.equal(graph_1.inputs["sample"], feeds[2]["sample"])  # the latest input was copied in before the replay
    assert outs[0]["noise_pred"] is not graph_1.outputs["noise_pred"]  # a copy: the next replay overwrites the buffer


def test_a_failed_capture_is_not_reported_as_cuda_graphs(monkeypatch):
    # Results report graphs that really replay (RELIABILITY #15), not the cuda_graph request.
    backend, _ = fake_backend()
    monkeypatch.setattr(backend, "_capture", lambda inputs: None)
    monkeypatch.setattr(backend, "_execute", lambda inputs: {})
    backend._run_graph({"sample": torch.zeros(1, 3, 8, 8)})
    assert backend._graphs and not backend.replays_graphs
