"""The onnxruntime backend: CPU, CUDA or TensorRT execution providers, torch tensors in and out.

IO binding hands ONNX Runtime the torch tensors' memory directly, inputs and pre-allocated
outputs alike, so a step does not copy through NumPy (nor leave the GPU on CUDA).

Providers (RELIABILITY #15). ONNX Runtime silently drops an execution provider it cannot start
(no CUDA libraries, no TensorRT) and runs on the next one, down to the CPU. After opening the
session the providers it really uses (`session.get_providers()`) are compared with those asked
for: a missing one is a warning, or with `strict=True` an error. `backend.providers` is
reported with every result. A CUDA backend whose session fell back to the CPU binds host memory
(ONNX Runtime cannot copy CUDA memory without a GPU provider: "no data transfer registered") and
returns its outputs on its device, so the fallback that the warning names really runs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from diffrt.components import ComponentSpec, tensor_shape
from diffrt.errors import BackendUnavailableError

log = logging.getLogger(__name__)
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")  # those that take CUDA memory
_ELEMENT_TYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.int32: "int32",
                  torch.bfloat16: "bfloat16"}


def default_providers(device: torch.device) -> list:
    import onnxruntime as ort

    have = ort.get_available_providers()
    if device.type == "cuda":
        wanted = [p for p in GPU_PROVIDERS if p in have]
        if not wanted:
            raise BackendUnavailableError(f"onnxruntime has no CUDA provider here (providers: {', '.join(have)}); pip install onnxruntime-gpu (not both onnxruntime and onnxruntime-gpu)")
        return [(p, {"device_id": device.index or 0}) for p in wanted] + ["CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, spec: ComponentSpec, device: str | torch.device = "cpu",
                 providers: list | None = None, threads: int | None = None, strict: bool = False):
        import onnxruntime as ort

        self.spec = spec
        self.device = torch.device(device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        requested = providers or default_providers(self.device)
        self.session = ort.InferenceSession(str(onnx_path), options, providers=requested)
        self.requested_providers = [p if isinstance(p, str) else p[0] for p in requested]
        self.providers = self.session.get_providers()  # what really runs: reported with every result
        self.missing_providers = check_providers(spec.name, self.requested_providers, self.providers, strict)
        # A CUDA session that fell back to the CPU cannot read CUDA memory: bind host memory then.
        fell_back = self.device.type == "cuda" and not any(p in self.providers for p in GPU_PROVIDERS)
        self._io_device = torch.device("cpu") if fell_back else self.device
        self._input_dtypes = {i.name: _onnx_dtype(i.type) for i in self.session.get_inputs()}
        self._output_dtypes = {o.name: _onnx_dtype(o.type) for o in self.session.get_outputs()}

    def run(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        binding = self.session.io_binding()
        sizes: dict[str, int] = {}
        keep = []  # the bound tensors must outlive the run
        io = self._io_device
        for spec in self.spec.inputs:
            t = feed[spec.name].to(io, self._input_dtypes[spec.name]).contiguous()
            keep.append(t)
            sizes.update({d: s for d, s in zip(spec.dims, t.shape) if isinstance(d, str)})
            binding.bind_input(spec.name, io.type, io.index or 0, _ELEMENT_TYPES[t.dtype], list(t.shape), t.data_ptr())
        outputs = {}
        for spec in self.spec.outputs:
            out = torch.empty(tensor_shape(spec, sizes), dtype=self._output_dtypes[spec.name], device=io)
            binding.bind_output(spec.name, io.type, io.index or 0, _ELEMENT_TYPES[out.dtype], list(out.shape), out.data_ptr())
            outputs[spec.name] = out
        if io.type == "cuda":
            # ORT runs on its own stream: make it see inputs written on torch's current stream.
            torch.cuda.current_stream(io).synchronize()
        self.session.run_with_iobinding(binding)
        return outputs if io == self.device else {name: t.to(self.device) for name, t in outputs.items()}


def check_providers(component: str, requested: list[str], used: list[str], strict: bool) -> list[str]:
    """Every requested provider must be in the session: a fallback is a warning, or an error when
    strict. Returns the requested providers the session runs without."""
    missing = [p for p in requested if p not in used]
    if not missing:
        return missing
    message = (f"{component}: ONNX Runtime did not start {', '.join(missing)} (asked for {', '.join(requested)}) and runs "
               f"on {', '.join(used)}; see ONNX Runtime's log for why")
    if strict:
        raise BackendUnavailableError(f"{message}; strict mode refuses a fallback")
    log.warning("%s; strict mode (--strict) makes this an error", message)
    return missing


def _onnx_dtype(type_str: str) -> torch.dtype:
    # ORT reports "tensor(float)", "tensor(float16)", "tensor(int64)", ...
    name = type_str[len("tensor("):-1]
    return {"float": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32,
            "bfloat16": torch.bfloat16, "double": torch.float64}[name]
