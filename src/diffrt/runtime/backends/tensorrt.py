"""The TensorRT backend: a serialized engine run on torch tensors, on the GPU, with no host copies.

    backend = TensorRTBackend("artifact/unet/engine.plan", spec)
    backend.run({"sample": x, "timestep": t}) -> {"noise_pred": eps}

Inputs are bound by address (`set_tensor_address(name, tensor.data_ptr())`), outputs are torch
tensors allocated from the shapes TensorRT infers, and `execute_async_v3` is enqueued on a CUDA
stream; nothing passes through NumPy or the host.

Threads (RELIABILITY #14). An execution context holds per-run state (input shapes, bound
addresses, scratch memory), so two threads must never drive one context at once. Each backend
owns one context and one CUDA stream, and `run` holds a lock: sharing one backend between
threads is safe but serial. For concurrency give each worker thread its own `backend.clone()`
(a new context and stream on the same deserialized engine, so the weights are not duplicated).

Streams. `run` waits for the caller's current stream before reading the inputs, and makes the
caller's stream wait for the engine before the outputs are used, so the caller never syncs.

Addresses. TensorRT reads and writes I/O only at 256-byte aligned addresses (setTensorAddress).
Fresh torch allocations are aligned, but a view into a bigger tensor (`x[1:]`, a chunk) starts at
its offset, so such an input is copied first.

Refit (`refit`, used by lora_scale's EngineLora). The loaded engine's weights are swapped in memory
(the engine file is untouched). TensorRT leaves a refit undefined while work is enqueued, so the
device is synchronised first; contexts stay valid, but captured graphs are dropped and captured
again on their next run, since TensorRT promises nothing about the buffers a graph baked in. That
holds for every clone of the backend too: they share the engine, so a refit through one drops the
graphs of all (a refit count they share tells them).

CUDA graphs (`cuda_graph=True`). Launch overhead is a real share of a small UNet's step. The
first run for each input-shape key captures the engine's launch into a CUDA graph over static
input/output buffers; later runs of that shape copy the inputs in, replay, and return copies
of the outputs (the static buffers are overwritten by the next replay). A graph is worth it
where shapes repeat: every step of one generation, or a service's few batch sizes.

One execution context per graph. A captured `execute_async_v3` bakes in what the enqueue
launched: kernel arguments for those shapes and addresses, and copies from the context's own
buffers, which TensorRT rewrites on the first enqueue after a shape change (hence TensorRT's
advice to enqueue once after `set_input_shape` before capturing). Replaying a graph after the
same context ran another shape would read state prepared for that other shape, and setting the
shapes again before the replay does not help, since only an enqueue rebuilds that state. So each
graph gets a context of its own whose shapes and addresses never change after capture. The graph
contexts share one block of activation memory (`USER_MANAGED`), which is safe because replays
never overlap: they run under the backend's lock, on its one stream.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from diffrt.components import ComponentSpec
from diffrt.errors import ArtifactError, BackendUnavailableError, ShapeOutOfRangeError

log = logging.getLogger(__name__)

MAX_GRAPHS = 16  # shape keys captured per backend; later keys run without a graph
ALIGNMENT = 256  # bytes: IExecutionContext.setTensorAddress wants every I/O pointer aligned to this


@dataclass
class _Graph:
    """One captured shape key: its own context, the static buffers it reads and writes, the graph."""

    context: object
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph


def torch_dtype(trt, trt_type) -> torch.dtype:
    """The torch dtype of a TensorRT DataType."""
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool}
    for name, dtype in (("BF16", torch.bfloat16), ("INT64", torch.int64), ("UINT8", torch.uint8), ("FP8", torch.float8_e4m3fn)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = dtype
    if trt_type not in table:
        raise ArtifactError(f"engine tensor type {trt_type} has no torch equivalent diffrt handles")
    return table[trt_type]


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy at a fresh (aligned) address when a storage offset leaves it off the 256-byte
    alignment TensorRT requires of every I/O pointer; TensorRT does not copy to fix it up."""
    return t if t.data_ptr() % ALIGNMENT == 0 else t.clone(memory_format=torch.contiguous_format)


def load_engine(engine_path: str | Path, device: torch.device):
    """Deserialize an engine file on `device`; a typed error if TensorRT refuses it."""
    from diffrt.export.tensorrt import error_mark, errors_since, import_tensorrt, trt_logger

    trt = import_tensorrt()
    path = Path(engine_path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; build it with `diffrt export --backend tensorrt`")
    logger = trt_logger()
    start = error_mark(logger.errors)
    with torch.cuda.device(device):
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        why = " | ".join(errors_since(logger.errors, start)[-2:]) or "no error logged"
        raise ArtifactError(f"TensorRT {trt.__version__} could not load {path} (truncated, or built by another TensorRT "
                            f"version or GPU) [{why}]; rebuild it with `diffrt export --backend tensorrt`")
    return trt, runtime, engine


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, engine_path: str | Path, spec: ComponentSpec, device: str | torch.device = "cuda",
                 cuda_graph: bool = False):
        self.spec = spec
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise BackendUnavailableError(f"the tensorrt backend runs on a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.engine_path = Path(engine_path)
        self.cuda_graph = cuda_graph
        # The runtime must outlive the engine, and the engine its contexts: keep all three.
        self._trt, self._runtime, self.engine = load_engine(engine_path, self.device)
        self._refits = [0]  # refits of the engine, one counter shared by every clone (copy.copy keeps it)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == self._trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        self._check_signature()
        self._dtypes = {n: torch_dtype(self._trt, self.engine.get_tensor_dtype(n)) for n in names}
        self._open_context()

    def _check_signature(self) -> None:
        """The engine must have the spec's tensors and accept at least the spec's ranges."""
        if sorted(self._inputs) != sorted(self.spec.input_names) or sorted(self._outputs) != sorted(self.spec.output_names):
            raise ArtifactError(f"{self.engine_path} has inputs {self._inputs} and outputs {self._outputs}; the {self.spec.name} "
                                f"spec expects {self.spec.input_names} -> {self.spec.output_names}; re-export")
        from diffrt.export.tensorrt import engine_profile

        for name, shapes in engine_profile(self.spec).items():
            lo, _, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))
            if any(a < b for a, b in zip(shapes["min"], lo)) or any(a > b for a, b in zip(shapes["max"], hi)):
                raise ArtifactError(f"{self.engine_path}: the engine's profile for {name} is {lo}..{hi}, narrower than the "
                                    f"manifest's {shapes['min']}..{shapes['max']}; rebuild the engine")

    def _open_context(self) -> None:
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(self.device)
        self._lock = threading.Lock()
        self._graphs: dict[tuple, _Graph | None] = {}
        self._graphs_refit = self._refits[0]  # the engine's refit count when these graphs were captured
        self._graph_memory: torch.Tensor | None = None  # activation memory the graph contexts share
        self._context = None
        if not self.cuda_graph:
            self._plain_context()  # made now, so that a GPU out of memory is an error at load

    def _plain_context(self):
        """The context of runs without a graph. A backend that replays graphs needs it only past
        MAX_GRAPHS shapes or after a failed capture, so there it is made on first use: made up front
        it would hold a second full block of activation memory besides the graphs' shared one."""
        if self._context is None:
            with torch.cuda.device(self.device):
                self._context = self.engine.create_execution_context()
            if self._context is None:
                raise ArtifactError(f"TensorRT could not create an execution context for {self.engine_path} (out of GPU memory?)")
        return self._context

    @property
    def replays_graphs(self) -> bool:
        """Whether some shape runs as a captured CUDA graph: what results report (RELIABILITY #15), since
        `cuda_graph=True` only asks for graphs, and a capture can fail or be unavailable."""
        return any(entry is not None for entry in self._graphs.values())

    def clone(self) -> TensorRTBackend:
        """A backend on the same engine with its own context and stream: one per worker thread."""
        twin = copy.copy(self)
        twin._open_context()
        return twin

    def refit(self, weights) -> dict:
        """Set the loaded engine's weights to `weights` (refit.RefitWeights: base + LoRA deltas) in memory.

        Clones share the engine, so they see the new weights too; none may run during the refit."""
        from diffrt.export.refit import open_refitter, set_engine_weights
        from diffrt.export.tensorrt import trt_logger

        logger = trt_logger()
        with self._lock, torch.cuda.device(self.device):
            refitter = open_refitter(self._trt, self.engine, self.engine_path, logger)
            torch.cuda.synchronize(self.device)  # no enqueued work may be pending on the engine (IRefitter)
            self._graphs.clear()  # recaptured on their next run, after the refit
            self._refits[0] += 1  # and so are the clones' graphs (see _run_graph)
            return set_engine_weights(self._trt, refitter, weights, self.engine_path, logger.errors)

    def run(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Check against the built ranges first (RELIABILITY #3): a typed error naming the range,
        # never TensorRT's "no valid profile". The pipeline reports CFG's doubled batch itself.
        self.spec.check(feed)
        with self._lock, torch.cuda.device(self.device):
            caller = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(caller)  # inputs written on the caller's stream are ready
            with torch.cuda.stream(self.stream):
                inputs = {n: aligned(feed[n].to(self.device, self._dtypes[n]).contiguous()) for n in self._inputs}
                outputs = self._run_graph(inputs) if self.cuda_graph else self._execute(inputs)
                for t in inputs.values():
                    t.record_stream(self.stream)  # the engine may still be reading them
            caller.wait_stream(self.stream)
            for t in outputs.values():
                t.record_stream(caller)  # allocated on our stream, used on the caller's
        return outputs

    def _bind(self, ctx, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Set shapes and addresses on `ctx`; allocate the outputs at the shapes TensorRT infers."""
        for name, t in inputs.items():
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise ShapeOutOfRangeError(f"{self.spec.name}.{name}: shape {tuple(t.shape)} is outside the engine's profile "
                                           f"{self.engine.get_tensor_profile_shape(name, 0)}")
            self._set_address(ctx, name, t)
        outputs = {}
        for name in self._outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ArtifactError(f"{self.spec.name}.{name}: TensorRT could not infer the output shape ({shape}) from the inputs")
            out = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
            self._set_address(ctx, name, out)
            outputs[name] = out
        return outputs

    def _set_address(self, ctx, name: str, t: torch.Tensor) -> None:
        """set_tensor_address, whose False (unknown name, bad pointer) would otherwise surface only as a failed run."""
        if not ctx.set_tensor_address(name, t.data_ptr()):
            raise RuntimeError(f"TensorRT refused the address of {self.spec.name}.{name} (shape {tuple(t.shape)}, "
                               f"{t.dtype}); see the TensorRT log above")

    def _enqueue(self, ctx) -> None:
        if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.spec.name} ({self.engine_path}); see the TensorRT log above")

    def _execute(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ctx = self._plain_context()
        outputs = self._bind(ctx, inputs)
        self._enqueue(ctx)
        return outputs

    def _run_graph(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._graphs_refit != self._refits[0]:  # a clone refit the shared engine since these were captured
            self._graphs.clear()
            self._graphs_refit = self._refits[0]
        key = tuple((n, tuple(t.shape)) for n, t in inputs.items())
        if key not in self._graphs:
            self._graphs[key] = self._capture(inputs) if len(self._graphs) < MAX_GRAPHS else None
        entry = self._graphs[key]
        if entry is None:
            return self._execute(inputs)
        for name, t in inputs.items():
            entry.inputs[name].copy_(t)
        entry.graph.replay()  # on entry.context, whose shapes and addresses are this key's since capture
        return {name: t.clone() for name, t in entry.outputs.items()}

    def _graph_context(self):
        """A fresh context on the shared graph memory (see the module docstring); None if this TensorRT cannot."""
        trt, engine = self._trt, self.engine
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        size = getattr(engine, "device_memory_size_v2", None)  # TensorRT 10.1+; device_memory_size is deprecated there
        if size is None:
            size = getattr(engine, "device_memory_size", None)
        if strategy is None or size is None:
            return None
        ctx = engine.create_execution_context(strategy.USER_MANAGED)
        if ctx is None:
            return None
        if not size:  # an engine that needs no scratch memory: nothing to share
            return ctx
        if self._graph_memory is None:
            # torch's allocator aligns blocks to 512 bytes, more than the 256 TensorRT needs.
            self._graph_memory = torch.empty(size, dtype=torch.uint8, device=self.device)
        if hasattr(ctx, "set_device_memory"):
            ctx.set_device_memory(self._graph_memory.data_ptr(), size)
        else:
            ctx.device_memory = self._graph_memory.data_ptr()
        return ctx

    def _capture(self, inputs: dict[str, torch.Tensor]) -> _Graph | None:
        """Capture one launch for this shape key on its own context; None if it cannot be captured."""
        shapes = {n: tuple(t.shape) for n, t in inputs.items()}
        try:
            ctx = self._graph_context()
        except Exception as exc:  # noqa: BLE001 - no graph is a slower run, not a failure
            log.warning("%s: no execution context for a CUDA graph (%s); running without a graph", self.spec.name, exc)
            return None
        if ctx is None:
            log.warning("%s: this TensorRT cannot give a CUDA graph its own context; running without graphs", self.spec.name)
            return None
        static_in = {name: t.clone() for name, t in inputs.items()}
        static_out = self._bind(ctx, static_in)
        # TensorRT does shape-dependent setup on the first launch after a shape change; that
        # launch must happen outside the capture.
        self._enqueue(ctx)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self._enqueue(ctx)
        except Exception as exc:  # a layer that cannot be captured: run this shape without a graph
            log.warning("%s: CUDA graph capture failed for shapes %s (%s); running without a graph", self.spec.name, shapes, exc)
            return None
        log.debug("%s: captured a CUDA graph for %s", self.spec.name, shapes)
        return _Graph(ctx, static_in, static_out, graph)
