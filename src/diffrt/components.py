"""Components: named models with a fixed input/output signature, the same on every backend.

Each component declares, in one place, its input and output names, which axes are dynamic and
the (min, opt, max) range of each dynamic axis. The ONNX exporter reads its dynamic axes from
here, the TensorRT builder its optimisation profile, and every backend checks a request
against the ranges before running it (RELIABILITY #3: a shape outside the built profile is a
typed error naming the range, never an opaque engine failure).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffrt.errors import ShapeOutOfRangeError

Range = tuple[int, int, int]  # (min, opt, max)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32}


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor; each dim is a fixed size or the name of a dynamic axis."""

    name: str
    dims: tuple[int | str, ...]
    dtype: str = "float32"  # float inputs follow the component's precision where it is built
    high: int = 10  # integer inputs: example values are drawn from [0, high)

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.dims)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ranges: dict[str, Range] = field(default_factory=dict)
    # Dimensions whose size must be a multiple of this (latent UNets downsample by 2 per level).
    multiple_of: dict[str, int] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx's dynamic_axes for this component."""
        return {
            t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
            for t in (*self.inputs, *self.outputs)
            if any(isinstance(d, str) for d in t.dims)
        }

    def sizes(self, which: str = "opt", **overrides: int) -> dict[str, int]:
        pick = {"min": 0, "opt": 1, "max": 2}[which]
        return {**{k: r[pick] for k, r in self.ranges.items()}, **overrides}

    def input_shapes(self, which: str = "opt") -> dict[str, tuple[int, ...]]:
        sizes = self.sizes(which)
        return {t.name: t.shape(sizes) for t in self.inputs}

    def check(self, feed: dict[str, torch.Tensor]) -> None:
        """Raise ShapeOutOfRangeError if the feed's names or sizes are outside this component's ranges."""
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise ShapeOutOfRangeError(f"{self.name}: missing inputs {missing}; expected {self.input_names}")
        seen: dict[str, int] = {}
        for spec in self.inputs:
            tensor = feed[spec.name]
            if tensor.dim() != len(spec.dims):
                raise ShapeOutOfRangeError(f"{self.name}.{spec.name}: expected {len(spec.dims)} dims {spec.dims}, got shape {tuple(tensor.shape)}")
            for axis, (dim, size) in enumerate(zip(spec.dims, tensor.shape)):
                if isinstance(dim, int):
                    if size != dim:
                        raise ShapeOutOfRangeError(f"{self.name}.{spec.name}: axis {axis} must be {dim}, got {size}")
                    continue
                if seen.setdefault(dim, size) != size:
                    raise ShapeOutOfRangeError(f"{self.name}: axis '{dim}' is {seen[dim]} in one input and {size} in {spec.name}")
        for dim, size in seen.items():
            self.check_size(dim, size)

    def check_size(self, dim: str, size: int, what: str | None = None) -> None:
        lo, _, hi = self.ranges.get(dim, (1, 1, 1 << 30))
        if not lo <= size <= hi:
            raise ShapeOutOfRangeError(f"{self.name}: {what or f'{dim} {size}'} is outside the built range [{lo}, {hi}]; re-export with a wider --{dim.split('_')[-1]} range or ask for a size inside it")
        m = self.multiple_of.get(dim)
        if m and size % m:
            raise ShapeOutOfRangeError(f"{self.name}: {what or f'{dim} {size}'} is not a multiple of {m}")

    def example_feed(self, which: str = "opt", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0, **sizes: int) -> dict[str, torch.Tensor]:
        """Deterministic sample inputs for export and parity checks."""
        g = torch.Generator().manual_seed(seed)
        dims = self.sizes(which, **sizes)
        feed = {}
        for spec in self.inputs:
            shape = spec.shape(dims)
            if spec.dtype.startswith("int"):
                feed[spec.name] = torch.randint(0, spec.high, shape, generator=g, dtype=DTYPES[spec.dtype])
            elif spec.name == "timestep":
                feed[spec.name] = torch.randint(0, 1000, shape, generator=g).to(dtype)
            elif spec.name == "conditioning_scale":
                feed[spec.name] = torch.full(shape, 0.75, dtype=dtype)
            else:
                feed[spec.name] = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
        return {k: v.to(device) for k, v in feed.items()}


def pixel_unet_spec(channels: int, sample_size: int, conditioned: bool, num_labels: int = 0,
                    batch: Range = (1, 8, 64), size: Range | None = None, multiple: int = 4) -> ComponentSpec:
    """unet of a pixel-space model: (sample, timestep[, class_labels]) -> noise_pred."""
    size = size or (sample_size, sample_size, sample_size)
    inputs = [TensorSpec("sample", ("batch", channels, "height", "width")), TensorSpec("timestep", ("batch",))]
    if conditioned:
        inputs.append(TensorSpec("class_labels", ("batch",), "int64", high=num_labels))
    return ComponentSpec(
        "unet",
        tuple(inputs),
        (TensorSpec("noise_pred", ("batch", channels, "height", "width")),),
        ranges={"batch": batch, "height": size, "width": size},
        multiple_of={"height": multiple, "width": multiple},
    )


def spec_to_dict(spec: ComponentSpec) -> dict:
    def t(ts: TensorSpec) -> dict:
        return {"name": ts.name, "dims": list(ts.dims), "dtype": ts.dtype, "high": ts.high}

    return {"name": spec.name, "inputs": [t(x) for x in spec.inputs], "outputs": [t(x) for x in spec.outputs],
            "ranges": {k: list(v) for k, v in spec.ranges.items()}, "multiple_of": dict(spec.multiple_of)}


def spec_from_dict(d: dict) -> ComponentSpec:
    def t(x: dict) -> TensorSpec:
        return TensorSpec(x["name"], tuple(x["dims"]), x["dtype"], x.get("high", 10))

    return ComponentSpec(d["name"], tuple(t(x) for x in d["inputs"]), tuple(t(x) for x in d["outputs"]),
                         {k: tuple(v) for k, v in d["ranges"].items()}, dict(d.get("multiple_of", {})))
