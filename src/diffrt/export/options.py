"""What `diffrt export` is asked for: ExportOptions and ExportResult, the checks that refuse an export that
cannot succeed before any model loads, and where automatic exports (generate, serve, demo over a model
folder) keep their artifacts."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from diffrt import atomic
from diffrt.errors import DiffrtError
from diffrt.export import manifest as mf
from diffrt.export.lora import locate_lora
from diffrt.export.onnx import DEFAULT_OPSET, DYNAMO_MIN_OPSET, EXPORTERS, TWO_GB, max_opset
from diffrt.runtime.backends import require_backend

Precision = Literal["fp32", "fp16", "bf16"]
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# Opset 17 is the first with LayerNormalization as one op (TensorRT fuses it); diffrt's parity
# tolerances are measured on graphs exported at 17 and newer.
MIN_OPSET = 17


@dataclass
class ExportOptions:
    backend: Literal["onnx", "tensorrt"] = "onnx"
    precision: Precision = "fp32"
    batch: tuple[int, int, int] = (1, 8, 64)
    height: tuple[int, int, int] | None = None  # pixels; None: the model's sample size only
    width: tuple[int, int, int] | None = None
    opset: int | None = None  # None: the exporter's default (DEFAULT_OPSET)
    exporter: Literal["torchscript", "dynamo"] = "torchscript"  # torch.onnx's tracer, or its torch.export-based exporter
    loras: list[tuple[str, float]] = field(default_factory=list)
    verify: bool = True
    vae_encoder: bool = False  # text-to-image: also export the VAE encoder, for image-to-image on the backend
    # Graphs whose weights exceed this many bytes keep them in model.onnx.data, in the component's
    # own folder (RELIABILITY #6; protobuf cannot hold over 2 GB). A layout choice, not in the key.
    external_data_threshold: int = TWO_GB
    # TensorRT: the builder's workspace cap in GiB (None: 3/4 of the GPU memory free when the build starts). A
    # resource for the build, not a property of the engine: in neither key, nor in the folder name (repr=False).
    workspace_gb: float | None = field(default=None, repr=False)

    @property
    def onnx_opset(self) -> int:
        """The opset the graphs are written in: the one asked for, else the exporter's default."""
        return DEFAULT_OPSET.get(self.exporter, DEFAULT_OPSET["torchscript"]) if self.opset is None else self.opset


@dataclass
class ExportResult:
    folder: Path
    cache_hit: bool
    manifest: dict
    seconds: float


# The largest range ends an export takes: it traces at OPT and checks parity at MIN and MAX, in PyTorch too, so a
# mistyped 100000 was a 100000 x 100000 image traced (minutes, then out of memory in a traceback).
RANGE_LIMITS = {"batch": 4096, "height": 16384, "width": 16384}


def parse_range(text: str, name: str) -> tuple[int, int, int]:
    """'MIN:OPT:MAX' (or one number for a fixed size) -> (min, opt, max)."""
    if not re.fullmatch(r"[0-9]{1,9}(:[0-9]{1,9}:[0-9]{1,9})?", text):  # int() took '1_000', '+4', ' 1' and any length
        raise DiffrtError(f"--{name} {text!r} is not MIN:OPT:MAX with whole numbers (or one number), e.g. 1:2:4")
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 1:
        parts *= 3
    if not 1 <= parts[0] <= parts[1] <= parts[2]:
        raise DiffrtError(f"--{name} {text!r} must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX")
    check_range(tuple(parts), name)
    return tuple(parts)


def check_range(value: tuple[int, int, int] | None, name: str) -> None:
    """`parse_range`'s rule for ranges given to ExportOptions directly (the Python API skips the CLI's
    parsing): a reversed or zero range would be traced and recorded in the manifest as it stands,
    and fail later, or never, with no word of which option was wrong."""
    if value is None:
        return
    ok = isinstance(value, (tuple, list)) and len(value) == 3 and all(isinstance(v, int) for v in value)
    if not ok or not 1 <= value[0] <= value[1] <= value[2]:
        raise DiffrtError(f"{name} range {tuple(value) if isinstance(value, (tuple, list)) else value!r} must be "
                          f"(MIN, OPT, MAX) integers with 1 <= MIN <= OPT <= MAX, e.g. (1, 2, 4)")
    limit = RANGE_LIMITS.get(name)
    if limit is not None and value[2] > limit:
        unit = " pixels" if name != "batch" else ""
        raise DiffrtError(f"the {name} range (--{name}) reaches {value[2]}{unit}, past {limit}{unit}: an export traces and "
                          "checks parity at these sizes; give the range the service will run")


def check_options(options: ExportOptions, out: Path | None = None) -> None:
    """Refuse, in one line, an export that cannot succeed, before any model is loaded or traced."""
    if out is not None and out.exists() and not out.is_dir():
        raise DiffrtError(f"--out {out} is a file; an export writes a folder there: pass a new or existing folder")
    for path, scale in options.loras:
        # As the CLI's FILE:SCALE refuses it: NaN fused into every weight, and never equal to itself, never a cache hit
        if not (isinstance(scale, numbers.Real) and not isinstance(scale, bool) and math.isfinite(scale)):
            raise DiffrtError(f"the LoRA scale of {path} must be a finite number, got {scale!r}")
        locate_lora(Path(path))  # a file, or a folder holding one (train dreambooth-lora's output)
    for name in ("batch", "height", "width"):
        check_range(getattr(options, name), name)
    if options.exporter not in EXPORTERS:
        raise DiffrtError(f"--exporter {options.exporter!r} is not one of {', '.join(EXPORTERS)}")
    if options.onnx_opset < MIN_OPSET:
        raise DiffrtError(f"--opset {options.onnx_opset} is below {MIN_OPSET}, the oldest opset diffrt exports "
                          f"(LayerNormalization is one op from {MIN_OPSET} on); use --opset {MIN_OPSET} or newer")
    if options.onnx_opset > max_opset():
        raise DiffrtError(f"--opset {options.onnx_opset} is above {max_opset()}, the newest opset torch {torch.__version__} "
                          f"exports; use --opset {MIN_OPSET} to {max_opset()}, or leave --opset out")
    if options.exporter == "dynamo" and options.onnx_opset < DYNAMO_MIN_OPSET:
        raise DiffrtError(f"--exporter dynamo writes opset {DYNAMO_MIN_OPSET} or newer, not {options.onnx_opset}; "
                          f"pass --opset {DYNAMO_MIN_OPSET} or leave --opset out")
    gib = options.workspace_gb
    if gib is not None and (isinstance(gib, bool) or not isinstance(gib, (int, float)) or not 0 < gib < 1e6):
        raise DiffrtError(f"--workspace-gb {gib!r} must be a positive number of GiB, e.g. 8")
    if gib is not None and options.backend != "tensorrt":
        raise DiffrtError("--workspace-gb caps TensorRT's builder; it needs --backend tensorrt")
    if options.backend == "tensorrt":
        require_backend("tensorrt")  # one line naming the backends this machine has
    elif options.precision == "bf16":
        # Verifying in fp32 instead would check another graph than the one shipped; say so instead.
        raise DiffrtError("--precision bf16 needs --backend tensorrt: ONNX Runtime has no bf16 Conv kernel on the CPU, so a "
                          "bf16 ONNX can neither be checked against PyTorch nor run here; use --precision fp16 or fp32 "
                          "for an ONNX export")


def options_text(options: ExportOptions) -> str:
    """The settings an automatic export's folder is named by: their repr, the default opset resolved (the
    default and 17 are one export). `vae_encoder`, a later field, is left out at its default, so that the
    folders made before it (the digits model's, for `diffrt demo`) are still found."""
    text = repr(replace(options, opset=options.onnx_opset))
    return text if options.vae_encoder else text.replace(", vae_encoder=False", "")


def default_artifact_dir(model_dir: Path, options: ExportOptions) -> Path:
    """Where `diffrt demo` / `generate` keep an automatic export: diffrt's cache (atomic.cache_dir), by source and settings."""
    tag = mf.cache_key({"src": str(model_dir.resolve()), "sha": atomic.sha256_folder(model_dir), "opts": options_text(options)})[:16]
    return atomic.cache_dir() / "artifacts" / f"{model_dir.name}-{tag}"
