"""Components: named models with a fixed input/output signature, the same on every backend.

Each component declares, in one place, its input and output names, which axes are dynamic and
the (min, opt, max) range of each dynamic axis. The ONNX exporter reads its dynamic axes from
here, the TensorRT builder its optimisation profile, and every backend checks a request
against the ranges before running it (RELIABILITY #3: a shape outside the built profile is a
typed error naming the range, never an opaque engine failure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from diffrt.errors import ShapeOutOfRangeError

Range = tuple[int, int, int]  # (min, opt, max)
CONTROL_CHANNELS = 3  # a ControlNet's conditioning image is RGB
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32}


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor; each dim is a fixed size or the name of a dynamic axis."""

    name: str
    dims: tuple[int | str, ...]
    dtype: str = "float32"  # float inputs follow the component's precision where it is built, unless pinned
    high: int = 10  # integer inputs: example values are drawn from [0, high)
    # Keep `dtype` in every precision. The timestep is pinned to fp32: in bf16 (8 mantissa bits) 999
    # rounds to 1000, in fp16 a fractional timestep (998.73, Karras sigmas) to a multiple of 0.5, and
    # the sinusoidal time embedding turns up to 1 rad per step. diffusers computes that embedding in
    # fp32 from an fp32 timestep for half UNets too (get_time_embed), which is the reference.
    pinned: bool = False

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.dims)

    def torch_dtype(self, precision: torch.dtype = torch.float32) -> torch.dtype:
        """This tensor's dtype in a component built at `precision`."""
        if self.pinned or self.dtype.startswith("int"):
            return DTYPES[self.dtype]
        return precision


def timestep_spec() -> TensorSpec:
    """A UNet's or ControlNet's timestep, one per image: fp32 in every precision (see TensorSpec.pinned)."""
    return TensorSpec("timestep", ("batch",), pinned=True)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ranges: dict[str, Range] = field(default_factory=dict)
    # Dimensions whose size must be a multiple of this (latent UNets downsample by 2 per level).
    multiple_of: dict[str, int] = field(default_factory=dict)
    # The ranges are what eager PyTorch runs the model at, not an export's (they are never written to a manifest):
    # a size outside them is the model's limit, which no re-export widens.
    eager: bool = False

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
        """Raise ShapeOutOfRangeError if the feed's names or sizes are outside this component's ranges, or an integer
        input is fed other numbers (no value is read: that would sync the device on every call)."""
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise ShapeOutOfRangeError(f"{self.name}: missing inputs {missing}; expected {self.input_names}")
        seen: dict[str, int] = {}
        for spec in self.inputs:
            tensor = feed[spec.name]
            # An engine casts its feed to the graph's types: 1.7 would run as label 1, where PyTorch refuses it.
            if spec.dtype.startswith("int") and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
                raise ShapeOutOfRangeError(f"{self.name}.{spec.name}: expected integers ({spec.dtype}), got {tensor.dtype}")
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
            flag = dim.split("_")[-1]  # diffrt export's --batch, --height and --width set these ranges; nothing sets the others
            fix = (f"re-export with a wider --{flag} range or ask for a size inside it" if flag in ("batch", "height", "width")
                   and not self.eager else "ask for a size inside it")
            where = "the range eager PyTorch runs this model at" if self.eager else "the built range"
            raise ShapeOutOfRangeError(f"{self.name}: {what or f'{dim} {size}'} is outside {where} [{lo}, {hi}]; {fix}")
        m = self.multiple_of.get(dim)
        if m and size % m:
            down = size // m * m  # the nearest multiple inside the range, the smaller one on a tie
            near = [s for s in sorted((down, down + m), key=lambda s: abs(s - size)) if lo <= s <= hi]
            raise ShapeOutOfRangeError(f"{self.name}: {what or f'{dim} {size}'} is not a multiple of {m}"
                                       + (f"; try {near[0]}" if near else ""))

    def example_feed(self, which: str = "opt", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0, **sizes: int) -> dict[str, torch.Tensor]:
        """Deterministic sample inputs for export and parity checks: float inputs in `dtype`, pinned ones in their own."""
        g = torch.Generator().manual_seed(seed)
        dims = self.sizes(which, **sizes)
        feed = {}
        for spec in self.inputs:
            shape, kind = spec.shape(dims), spec.torch_dtype(dtype)
            if spec.dtype.startswith("int"):
                feed[spec.name] = torch.randint(0, spec.high, shape, generator=g, dtype=kind)
            elif spec.name == "timestep":
                feed[spec.name] = torch.randint(0, 1000, shape, generator=g).to(kind)
            elif spec.name == "conditioning_scale":  # each scale different, so that a swap shows
                feed[spec.name] = torch.linspace(0.75, 1.25, math.prod(shape), dtype=kind).reshape(shape)
            else:
                feed[spec.name] = torch.randn(shape, generator=g, dtype=torch.float32).to(kind)
        return {k: v.to(device) for k, v in feed.items()}


def pixel_unet_spec(channels: int, sample_size: int, conditioned: bool, num_labels: int = 0,
                    batch: Range = (1, 8, 64), size: Range | None = None, multiple: int = 4) -> ComponentSpec:
    """unet of a pixel-space model: (sample, timestep[, class_labels]) -> noise_pred."""
    size = size or (sample_size, sample_size, sample_size)
    inputs = [TensorSpec("sample", ("batch", channels, "height", "width")), timestep_spec()]
    if conditioned:
        inputs.append(TensorSpec("class_labels", ("batch",), "int64", high=num_labels))
    return ComponentSpec(
        "unet",
        tuple(inputs),
        (TensorSpec("noise_pred", ("batch", channels, "height", "width")),),
        ranges={"batch": batch, "height": size, "width": size},
        multiple_of={"height": multiple, "width": multiple},
    )


def spec_to_dict(spec: ComponentSpec, precision: torch.dtype | None = None) -> dict:
    """The spec as JSON data (manifests, ONNX metadata). A pinned tensor says so ("pinned": true); the
    others read as they did before pins existed. With `precision`, the component's build precision, a
    pin that changes nothing there is left out: the form cache keys hash, so that fp32 exports (and
    their engines) keep their keys while half-precision ones, whose timestep input changed, get new ones."""
    def t(ts: TensorSpec) -> dict:
        kept = ts.pinned and (precision is None or DTYPES[ts.dtype] != precision)
        return {"name": ts.name, "dims": list(ts.dims), "dtype": ts.dtype, "high": ts.high, **({"pinned": True} if kept else {})}

    return {"name": spec.name, "inputs": [t(x) for x in spec.inputs], "outputs": [t(x) for x in spec.outputs],
            "ranges": {k: list(v) for k, v in spec.ranges.items()}, "multiple_of": dict(spec.multiple_of)}


def spec_from_dict(d: dict) -> ComponentSpec:
    def t(x: dict) -> TensorSpec:
        # No "pinned": a spec from before pins (a half export's timestep then followed its precision).
        return TensorSpec(x["name"], tuple(x["dims"]), x["dtype"], x.get("high", 10), bool(x.get("pinned", False)))

    return ComponentSpec(d["name"], tuple(t(x) for x in d["inputs"]), tuple(t(x) for x in d["outputs"]),
                         {k: tuple(v) for k, v in d["ranges"].items()}, dict(d.get("multiple_of", {})))


# --- latent text-to-image components ---------------------------------------------------------------
#
# Latent sizes ("height", "width") are in latent pixels (image pixels / the VAE's factor of 8).
# Outputs at another resolution name a derived axis, "height*8" or "height/2", which `tensor_shape`
# resolves from the inputs' sizes (a backend allocating outputs needs it; inputs always use plain
# axis names, so `example_feed` and engine profiles see independent ranges).


def dim_size(dim: int | str, sizes: dict[str, int]) -> int:
    """The size of one dim: fixed, a named axis, or derived from one ('height*8', 'height/2')."""
    if isinstance(dim, int):
        return dim
    if dim in sizes:
        return sizes[dim]
    for op in ("*", "/"):
        if op in dim:
            axis, factor = dim.split(op)
            return sizes[axis] * int(factor) if op == "*" else sizes[axis] // int(factor)
    raise KeyError(f"axis '{dim}' has no size; known axes: {sorted(sizes)}")


def tensor_shape(spec: TensorSpec, sizes: dict[str, int]) -> tuple[int, ...]:
    """`spec.shape(sizes)` that also resolves derived axes (outputs at another resolution)."""
    return tuple(dim_size(d, sizes) for d in spec.dims)


def text_encoder_spec(vocab_size: int, hidden_size: int, max_length: int = 77, batch: Range = (1, 2, 8),
                      num_layers: int | None = None) -> ComponentSpec:
    """text_encoder (CLIPTextModel): input_ids [batch, sequence] (+ clip_skip [batch]) -> last_hidden_state [batch, sequence,
    hidden]. With `num_layers` (the encoder's), clip_skip is an input, one per row, 0 to num_layers - 1: the final layer
    norm of the hidden state that many layers before the last, as diffusers' encode_prompt(clip_skip=...) (0:
    last_hidden_state). Specs from manifests written before it have input_ids alone."""
    skip = (TensorSpec("clip_skip", ("batch",), "int64", high=num_layers),) if num_layers else ()
    return ComponentSpec(
        "text_encoder",
        (TensorSpec("input_ids", ("batch", "sequence"), "int64", high=vocab_size), *skip),
        (TensorSpec("last_hidden_state", ("batch", "sequence", hidden_size)),),
        ranges={"batch": batch, "sequence": (1, max_length, max_length)},
    )


def _latent_inputs(channels: int, hidden_size: int) -> list[TensorSpec]:
    return [TensorSpec("sample", ("batch", channels, "height", "width")), timestep_spec(),
            TensorSpec("encoder_hidden_states", ("batch", "sequence", hidden_size))]


def _guidance_inputs(guidance_embed_dim: int | None) -> list[TensorSpec]:
    # A guidance-distilled UNet (LCM's, config time_cond_proj_dim) takes the embedding of its guidance
    # scale w, one row per image; every other UNet keeps the three inputs it always had, and so its artifacts.
    return [] if guidance_embed_dim is None else [TensorSpec("timestep_cond", ("batch", guidance_embed_dim))]


def _latent_ranges(batch: Range, height: Range, width: Range, max_length: int) -> dict[str, Range]:
    return {"batch": batch, "height": height, "width": width, "sequence": (1, max_length, max_length)}


def _control_inputs(num_controlnets: int, num_residuals: int) -> list[TensorSpec]:
    # The conditioning images are in image pixels: their own axes, with ranges vae_factor x the latent
    # ones. K ControlNets take their K RGB images stacked on the channel axis, in the order they were
    # exported, and one row of scales each, one scale per residual (down residuals, then mid): the
    # ControlNet's conditioning scale, times diffusers' guess-mode depth weights where they apply, so one
    # graph runs both modes. K = 1 is the single-ControlNet signature ([batch, 3, ...], [1, R]).
    return [TensorSpec("controlnet_cond", ("batch", CONTROL_CHANNELS * num_controlnets, "image_height", "image_width")),
            TensorSpec("conditioning_scale", (num_controlnets, num_residuals))]


def _scale_input(spec: ComponentSpec) -> TensorSpec | None:
    return next((t for t in spec.inputs if t.name == "conditioning_scale"), None)


def num_controlnets(spec: ComponentSpec) -> int:
    """How many ControlNets a controlnet / unet_controlnet component holds (0 for anything else)."""
    scale = _scale_input(spec)
    return int(scale.dims[0]) if scale is not None else 0


def scaled_residuals(spec: ComponentSpec) -> int:
    """R, the residuals whose scales a controlnet / unet_controlnet graph takes one by one (conditioning_scale
    [K, R]); 0 for one exported before diffrt took guess mode's depth weights, which takes a scale per ControlNet ([K])."""
    scale = _scale_input(spec)
    return int(scale.dims[1]) if scale is not None and len(scale.dims) == 2 else 0


def _image_ranges(height: Range, width: Range, vae_factor: int) -> dict[str, Range]:
    return {"image_height": tuple(vae_factor * s for s in height), "image_width": tuple(vae_factor * s for s in width)}


def latent_unet_spec(in_channels: int, out_channels: int, hidden_size: int, *, batch: Range, height: Range, width: Range,
                     max_length: int = 77, multiple: int = 1, guidance_embed_dim: int | None = None) -> ComponentSpec:
    """unet (UNet2DConditionModel): (sample, timestep, encoder_hidden_states[, timestep_cond]) -> noise_pred, latent
    sizes; timestep_cond [batch, guidance_embed_dim] only for a guidance-distilled UNet (time_cond_proj_dim)."""
    return ComponentSpec(
        "unet",
        tuple(_latent_inputs(in_channels, hidden_size) + _guidance_inputs(guidance_embed_dim)),
        (TensorSpec("noise_pred", ("batch", out_channels, "height", "width")),),
        ranges=_latent_ranges(batch, height, width, max_length),
        multiple_of={"height": multiple, "width": multiple},
    )


def controlnet_spec(in_channels: int, hidden_size: int, residuals: list[tuple[int, int]], *, batch: Range, height: Range,
                    width: Range, max_length: int = 77, multiple: int = 1, vae_factor: int = 8,
                    num_controlnets: int = 1, pooled: bool = False) -> ComponentSpec:
    """controlnet (ControlNetModel, or diffusers' MultiControlNetModel for several) alone: the UNet's
    inputs + (controlnet_cond, conditioning_scale) -> down_block_res_0..N-1 and mid_block_res, each
    ControlNet's multiplied by its row of scales, residual by residual, and summed over the ControlNets.

    `residuals` lists (channels, downscale) of each down residual, then the mid residual's. `pooled`: every
    ControlNet pools its conditions (global_pool_conditions, shuffle): each residual is 1 x 1, broadcast by the UNet."""
    def axis(name: str, down: int) -> str | int:
        return 1 if pooled else name if down == 1 else f"{name}/{down}"

    outputs = [TensorSpec(f"down_block_res_{i}", ("batch", c, axis("height", d), axis("width", d)))
               for i, (c, d) in enumerate(residuals[:-1])]
    c, d = residuals[-1]
    outputs.append(TensorSpec("mid_block_res", ("batch", c, axis("height", d), axis("width", d))))
    return ComponentSpec(
        "controlnet",
        tuple(_latent_inputs(in_channels, hidden_size) + _control_inputs(num_controlnets, len(residuals))),
        tuple(outputs),
        ranges={**_latent_ranges(batch, height, width, max_length), **_image_ranges(height, width, vae_factor)},
        multiple_of={"height": multiple, "width": multiple, "image_height": multiple * vae_factor, "image_width": multiple * vae_factor},
    )


def unet_controlnet_spec(in_channels: int, out_channels: int, hidden_size: int, *, num_residuals: int, batch: Range, height: Range,
                         width: Range, max_length: int = 77, multiple: int = 1, vae_factor: int = 8, num_controlnets: int = 1,
                         guidance_embed_dim: int | None = None) -> ComponentSpec:
    """unet_controlnet: the ControlNet(s) and UNet fused in one graph, the conditioning scales an input (one per
    ControlNet and residual, `num_residuals` of them) -> noise_pred; timestep_cond last, for a guidance-distilled
    UNet only (the UNet takes it, the ControlNets do not)."""
    return ComponentSpec(
        "unet_controlnet",
        tuple(_latent_inputs(in_channels, hidden_size) + _control_inputs(num_controlnets, num_residuals)
              + _guidance_inputs(guidance_embed_dim)),
        (TensorSpec("noise_pred", ("batch", out_channels, "height", "width")),),
        ranges={**_latent_ranges(batch, height, width, max_length), **_image_ranges(height, width, vae_factor)},
        multiple_of={"height": multiple, "width": multiple, "image_height": multiple * vae_factor, "image_width": multiple * vae_factor},
    )


def vae_encoder_spec(latent_channels: int, *, batch: Range, height: Range, width: Range, vae_factor: int = 8, multiple: int = 1,
                     in_channels: int = 3) -> ComponentSpec:
    """vae_encoder (AutoencoderKL's encoder and quant_conv): image [batch, 3, 8h, 8w] in model space [-1, 1] ->
    latent_parameters [batch, 2 x 4, h, w], the mean and log-variance of the posterior, which the pipeline samples
    with its own generators (a seed draws what it draws in diffusers' img2img). `height`/`width`: latent sizes."""
    return ComponentSpec(
        "vae_encoder",
        (TensorSpec("image", ("batch", in_channels, "image_height", "image_width")),),
        (TensorSpec("latent_parameters", ("batch", 2 * latent_channels, f"image_height/{vae_factor}", f"image_width/{vae_factor}")),),
        ranges={"batch": batch, **_image_ranges(height, width, vae_factor)},
        multiple_of={"image_height": multiple * vae_factor, "image_width": multiple * vae_factor},
    )


def vae_decoder_spec(latent_channels: int, *, batch: Range, height: Range, width: Range, vae_factor: int = 8,
                     out_channels: int = 3) -> ComponentSpec:
    """vae_decoder (AutoencoderKL.decode): latent [batch, 4, h, w] -> image [batch, 3, 8h, 8w] in model space [-1, 1]."""
    return ComponentSpec(
        "vae_decoder",
        (TensorSpec("latent", ("batch", latent_channels, "height", "width")),),
        (TensorSpec("image", ("batch", out_channels, f"height*{vae_factor}", f"width*{vae_factor}")),),
        ranges={"batch": batch, "height": height, "width": width},
    )
