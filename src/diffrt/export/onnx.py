"""torch -> ONNX for one component, written atomically and checked.

The component's spec names the inputs, outputs and dynamic axes; this module only traces.
Graphs over 2 GB keep their weights in external data beside the .onnx file, in the
component's own folder (RELIABILITY #6), and the loader checks those files exist.

Two exporters, one result. "torchscript" (torch.onnx's tracer, opset 17 by default) is quick
and what the TensorRT refit path was first built on; PyTorch deprecates it. "dynamo" (the
torch.export-based exporter, PyTorch's default since 2.9, opset 18 or newer) captures the
graph with torch.export, each dynamic axis declared `Dim.DYNAMIC` so that relations between
axes (a ControlNet's conditioning image is 8x the latent) are derived rather than declared,
and cleans it up with onnxscript's optimizer. Both then go through the same save, shape
inference and checker, and the same parity check against PyTorch at export.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import shutil
import stat
import warnings
from pathlib import Path, PureWindowsPath

import torch
from torch import nn

from diffrt import atomic
from diffrt.components import ComponentSpec
from diffrt.errors import ArtifactError
from diffrt.export.optimize import upcast_normalizations

log = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
DYNAMO_MIN_OPSET = 18  # torch.export-based graphs use opset 18 ops (ReduceMean with axes as an input, ...)
TORCH_2_13_MAX_OPSET = 23  # what torch 2.13 declares, should a later torch move its private constant


def max_opset() -> int:
    """The newest opset this torch's ONNX exporters write (torch.onnx's declared ONNX_MAX_OPSET): a newer
    one fails deep inside the exporter, after an export has begun."""
    try:
        from torch.onnx import _constants

        return int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):
        return TORCH_2_13_MAX_OPSET
TWO_GB = 2 * 1024**3
PROTOBUF_LIMIT = 2**31 - 1  # bytes in one serialized protobuf message: a model.onnx without external data
HALF_TYPES = {torch.float16: 10, torch.bfloat16: 16}  # onnx.TensorProto.FLOAT16, BFLOAT16
ONNX_TYPES = {torch.float32: 1, torch.int32: 6, torch.int64: 7, **HALF_TYPES}  # onnx.TensorProto elem types


def export_onnx(module: nn.Module, spec: ComponentSpec, folder: str | Path, *, opset: int | None = None,
                dtype: torch.dtype = torch.float32, external_data_threshold: int = TWO_GB,
                exporter: str = "torchscript") -> Path:
    """Trace `module` into folder/model.onnx (+ model.onnx.data when the weights are large).

    The folder is assembled under a temporary name and renamed into place, so an interrupted
    export leaves no model.onnx that a later run would trust.
    """
    import onnx

    if exporter not in EXPORTERS:
        raise ArtifactError(f"unknown ONNX exporter {exporter!r}; pass one of {', '.join(EXPORTERS)}")
    opset = DEFAULT_OPSET[exporter] if opset is None else opset
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.make_temp_dir(folder.parent, f".{folder.name}.")  # readable by others as the umask allows, unlike mkdtemp's
    try:
        # Float inputs in `dtype`, a pinned one (the timestep) in its own type: the graph declares each so.
        feed = spec.example_feed("opt", dtype=dtype, **trace_sizes(spec))
        args = tuple(feed[name] for name in spec.input_names)
        # Trace in the precision asked for, whatever the checkpoint was saved in (an fp16 folder
        # exported as fp32 would otherwise mix dtypes in one graph); never change the caller's module.
        sdpa = exporter == "torchscript" and dtype != torch.float32 and _sdpa_transformers(module)
        if sdpa or any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
            module = copy.deepcopy(module).to(dtype)
        if sdpa:
            for m in _sdpa_transformers(module):
                m.set_attn_implementation("eager")
        module.eval()
        raw = tmp / "raw.onnx"
        if exporter == "dynamo":
            _export_dynamo(module, args, spec, raw, opset)
        else:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
                torch.onnx.export(
                    module, args, str(raw), input_names=spec.input_names, output_names=spec.output_names,
                    dynamic_axes=spec.dynamic_axes(), opset_version=opset, do_constant_folding=True, dynamo=False,
                )
        model = onnx.load(str(raw), load_external_data=True)
        if dtype in HALF_TYPES:  # normalisation statistics in fp32, as PyTorch computes them (optimize.py)
            upcast_normalizations(model, HALF_TYPES[dtype])
        _describe(model, spec, dtype, exporter)
        # The threshold counts the weights; protobuf's limit is the whole file's (graph and all), so weights just
        # under 2 GiB may not fit in one file either.
        large = _weights_nbytes(model) > external_data_threshold or model.ByteSize() >= PROTOBUF_LIMIT
        out = tmp / "model.onnx"
        onnx.save_model(model, str(out), save_as_external_data=large, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        del model
        data = tmp / "model.onnx.data"
        if data.is_file():  # onnx creates it 0600: another user (the service of a CI-made artifact) could not read it
            data.chmod(stat.S_IMODE(out.stat().st_mode))  # model.onnx's: 0666 less the umask, as every artifact file
        for leftover in tmp.iterdir():
            if leftover.name not in ("model.onnx", "model.onnx.data"):
                leftover.unlink()
        _infer_shapes(out)
        onnx.checker.check_model(str(out))
        check_dynamic_axes(out, spec, exporter)
        check_input_types(out, spec, dtype, exporter)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s to %s (%s exporter, opset %d)", spec.name, folder / "model.onnx", exporter, opset)
    return folder / "model.onnx"


def trace_sizes(spec: ComponentSpec) -> dict[str, int]:
    """Sizes to trace at: the opt point, grown where it would put a size of 1 inside the model.

    Tracers take a size of 1 for a constant (broadcasting makes it special): an opt batch of 1, or
    a latent side that a UNet halves down to 1 at its deepest level (side / multiple_of < 2), would
    be fixed in the graph by torch.export and may be baked in by TorchScript. Such an axis is grown
    by the smallest whole factor that lifts it, together with every axis whose range is the same
    multiple of its own (a control image's side is the VAE factor x the latent side), as long as
    all of them stay in range and on their multiples; else it is left, and `check_dynamic_axes`
    refuses a graph whose axis came out fixed."""
    sizes = spec.sizes("opt")

    def deep_size(axis: str, size: int) -> int:
        return size // spec.multiple_of.get(axis, 1)

    def linked(a: str, b: str) -> bool:  # b's (min, opt, max) is one constant times a's
        ra, rb = spec.ranges[a], spec.ranges[b]
        return all(x * rb[0] == y * ra[0] for x, y in zip(ra, rb))

    grown = dict(sizes)
    for axis in spec.ranges:
        if deep_size(axis, grown[axis]) >= 2:
            continue
        group = [b for b in spec.ranges if linked(axis, b)]
        for k in range(2, spec.ranges[axis][2] // max(1, grown[axis]) + 1):
            fits = all(grown[b] * k <= spec.ranges[b][2] and grown[b] * k % spec.multiple_of.get(b, 1) == 0 for b in group)
            if fits and deep_size(axis, grown[axis] * k) >= 2:
                for b in group:
                    grown[b] *= k
                break
    return {axis: size for axis, size in grown.items() if size != sizes[axis]}


def check_dynamic_axes(path: Path, spec: ComponentSpec, exporter: str) -> None:
    """Every axis the spec lets vary must be symbolic in the graph's inputs and outputs: an exporter
    that fixed one would give a graph that fails, or worse, at other sizes."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    values = {v.name: v for v in (*graph.input, *graph.output)}
    for tensor in (*spec.inputs, *spec.outputs):
        value = values.get(tensor.name)
        if value is None:
            raise ArtifactError(f"{spec.name}: the {exporter} exporter wrote no {tensor.name!r}; expected {spec.input_names} "
                                f"-> {spec.output_names}")
        dims = value.type.tensor_type.shape.dim
        for i, axis in enumerate(tensor.dims):
            lo, _, hi = spec.ranges.get(axis, (0, 0, 0)) if isinstance(axis, str) else (0, 0, 0)
            if isinstance(axis, str) and lo < hi and i < len(dims) and dims[i].HasField("dim_value"):
                raise ArtifactError(f"{spec.name}: the {exporter} exporter fixed axis '{axis}' of {tensor.name} to "
                                    f"{dims[i].dim_value}, which the spec lets range over {lo}..{hi}; the graph would not "
                                    f"run at other sizes (try the other --exporter)")


def check_input_types(path: Path, spec: ComponentSpec, dtype: torch.dtype, exporter: str) -> None:
    """Every input must have the type the spec gives it at `dtype` (a pinned timestep stays fp32): the
    backends cast each feed to the declared type, so a half timestep would be rounded unseen."""
    import onnx

    names = {code: str(t).removeprefix("torch.") for t, code in ONNX_TYPES.items()}
    expected = {t.name: ONNX_TYPES[t.torch_dtype(dtype)] for t in spec.inputs}
    for value in onnx.load(str(path), load_external_data=False).graph.input:
        found = value.type.tensor_type.elem_type
        if value.name in expected and found != expected[value.name]:
            raise ArtifactError(f"{spec.name}: the {exporter} exporter declared input {value.name!r} as "
                                f"{names.get(found, found)}, the spec expects {names[expected[value.name]]} at "
                                f"{names[ONNX_TYPES[dtype]]}")


def _describe(model, spec: ComponentSpec, dtype: torch.dtype, exporter: str) -> None:
    """Say in the graph itself what it is (STYLE: config travels with every artifact): a model file
    copied out of its artifact folder still names its component, input ranges, precision and maker."""
    import json

    from diffrt import __version__
    from diffrt.components import spec_to_dict

    model.producer_name, model.producer_version = "diffrt", __version__
    props = {"diffrt.component": json.dumps(spec_to_dict(spec), sort_keys=True), "diffrt.dtype": str(dtype).removeprefix("torch."),
             "diffrt.exporter": exporter, "torch": torch.__version__}
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in props]  # the exporter's own
    del model.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        model.metadata_props.add(key=key, value=value)


def _export_dynamo(module: nn.Module, args: tuple, spec: ComponentSpec, raw: Path, opset: int) -> None:
    """torch.export-based export of `module` into `raw` (weights in raw's external data, always:
    the caller decides the final layout)."""
    if opset < DYNAMO_MIN_OPSET:
        raise ArtifactError(f"the dynamo exporter writes opset {DYNAMO_MIN_OPSET} or newer, not {opset}; "
                            f"pass --opset {DYNAMO_MIN_OPSET} (or leave --opset out)")
    dynamic = torch.export.Dim.DYNAMIC
    shapes = tuple({i: dynamic for i, d in enumerate(t.dims) if isinstance(d, str)} or None for t in spec.inputs)
    try:
        with torch.no_grad(), warnings.catch_warnings(), _quiet_loggers():
            warnings.simplefilter("ignore")  # deprecation and shape-guard notices
            program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=shapes, input_names=spec.input_names,
                                        output_names=spec.output_names, opset_version=opset, optimize=True, verbose=False)
            program.save(str(raw), external_data=True)
    except Exception as exc:  # torch.export's errors run to pages: the innermost cause's first lines name it
        raise ArtifactError(f"{spec.name}: the dynamo exporter could not capture the model ({_root_cause(exc)}); "
                            "try --exporter torchscript") from exc


def _root_cause(exc: BaseException) -> str:
    """The innermost exception's message on one line, without terminal colours: torch.onnx wraps
    torch.export's own error (the one that names the construct) in a page of advice."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    return " ".join(line.strip() for line in text.splitlines() if line.strip())[:400] or type(exc).__name__


@contextlib.contextmanager
def _quiet_loggers(names=("torch.onnx", "torch.export", "onnx_ir", "onnxscript"), level: int = logging.ERROR):
    """The dynamo exporter and its optimizer log a line per pass and per deduplicated initializer
    (hundreds at INFO), and a warning per torchvision op when torchvision is absent."""
    loggers = [logging.getLogger(name) for name in names]
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, saved):
            logger.setLevel(old)


def _sdpa_transformers(module: nn.Module) -> list[nn.Module]:
    """transformers models inside `module` that attend through SDPA.

    torch.onnx's TorchScript exporter writes a causal SDPA's mask as fp32 whatever the inputs' type,
    so an fp16 CLIP text encoder traced through SDPA mixes fp32 and fp16 tensors and ONNX Runtime
    refuses the graph (LayerNormalization "bound to different types"). transformers' eager attention
    builds its mask in the activations' dtype, and computes the same attention."""
    return [m for m in module.modules() if hasattr(m, "set_attn_implementation")
            and getattr(getattr(m, "config", None), "_attn_implementation", None) == "sdpa"]


def _infer_shapes(path: Path) -> None:
    """Annotate every intermediate tensor with its inferred shape, in place. By path, not in memory:
    a graph over 2 GB cannot be one protobuf, and its weights stay in their external file."""
    import onnx

    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(path), data_prop=True)
    except Exception as exc:  # noqa: BLE001 - an op whose shapes ONNX cannot infer: the graph is still valid
        log.info("%s: ONNX shape inference skipped (%s); the graph is kept without inferred shapes", path, exc)


def _weights_nbytes(model) -> int:
    import numpy as np
    from onnx import helper

    total = 0
    for init in model.graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        total += n * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    return total


def check_onnx_files(onnx_path: Path) -> None:
    """The model file and any external data it names must be present, and be plain files in its own folder
    (external_data_files), before ONNX Runtime or TensorRT see them."""
    if not onnx_path.is_file():
        raise ArtifactError(f"{onnx_path} is missing; re-run `diffrt export`")
    for name in external_data_files(onnx_path):
        if not (onnx_path.parent / name).is_file():
            raise ArtifactError(f"{onnx_path} needs external data {name} beside it, which is missing; copy the whole component folder")


def external_data_files(onnx_path: Path) -> list[str]:
    """The external data files the graph names (its tensors' `location`s), each refused unless it is a
    relative path inside the graph's folder: no '..', no symbolic link on the way. A graph is data: one
    naming ../../secret, /etc/... or a link out of the folder would have an ONNX Runtime that follows
    such paths (ONNX Runtime 1.32 refuses them; older releases pyproject allows may not), TensorRT's
    parser or a refit read a file the artifact's manifest never hashed."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    graphs = [model.graph, *model.functions]
    names = sorted({entry.value for graph in graphs for tensor in _tensors(graph)
                    for entry in tensor.external_data if entry.key == "location"})
    folder = onnx_path.parent
    for name in names:
        parts = re.split(r"[\\/]", name)  # either separator: a graph made on Windows may be opened there
        if not name:
            raise ArtifactError(f"{onnx_path} names external data with an empty location; re-run `diffrt export`")
        if Path(name).is_absolute() or PureWindowsPath(name).anchor:
            raise ArtifactError(f"{onnx_path} names external data at the absolute path {name!r}; a graph's data must sit in "
                                "its own folder: re-run `diffrt export`")
        if ".." in parts:
            raise ArtifactError(f"{onnx_path} names external data {name!r} outside its folder; a graph's data must sit in "
                                "its own folder: re-run `diffrt export`")
        if any(folder.joinpath(*parts[:i]).is_symlink() for i in range(1, len(parts) + 1)):
            raise ArtifactError(f"{onnx_path} names external data {name!r}, which is a symbolic link; copy the file "
                                "itself into the component folder (or re-run `diffrt export`)")
    return names


def _tensors(graph):
    """Every tensor a graph or function holds: initializers, and those in node attributes and subgraphs."""
    yield from getattr(graph, "initializer", ())
    for sparse in getattr(graph, "sparse_initializer", ()):
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attr in node.attribute:
            yield from (attr.t, *attr.tensors)
            for sparse in (attr.sparse_tensor, *attr.sparse_tensors):
                yield from (sparse.values, sparse.indices)
            for sub in (attr.g, *attr.graphs):
                yield from _tensors(sub)
