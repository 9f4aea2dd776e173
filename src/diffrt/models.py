"""Loading and saving diffusers models, the small configs used by tests and the demo, and the
digits model that ships inside the package.

Pixel-space models live in a diffusers pipeline folder:

    model_index.json      DDIMPipeline (a fine-tuned DDPMPipeline's stays one), so diffusers' own pipeline loads
                          the folder unchanged and samples an unconditional model; a class-conditioned UNet needs
                          class labels, which only diffrt's pipeline feeds (and the class-channels variant its
                          label embedding below)
    unet/                 UNet2DModel (config.json + diffusion_pytorch_model.safetensors)
    scheduler/            scheduler_config.json
    diffrt.json           how the model is conditioned (none, class embedding, class channels)
    class_embedding/      only for the "class channels" variant: the label embedding

A class-conditioned model reserves one extra label, `null_class_label`, for the unconditional
branch of classifier-free guidance.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from diffrt import atomic
from diffrt.errors import DiffrtError, ShapeOutOfRangeError
from diffrt.runtime.ddim import DDIMConfig

Conditioning = Literal["none", "class_embedding", "class_channels"]
log = logging.getLogger(__name__)

DIFFRT_CONFIG = "diffrt.json"
SHIPPED_DIGITS = Path(__file__).parent / "weights" / "digits"


def smallest_deepest_side(config) -> int:
    """The smallest side of a diffusers UNet's or ControlNet's deepest feature map at which it runs a batch of one: 1,
    or 2 where that level holds a GroupNorm with one channel per group (diffusers' tiny test models: 32 channels in 32
    groups), which a 1x1 map of one image gives a single value to normalise: torch refuses it ("Expected more than 1
    value per channel"). The deepest level normalises the last block's width and the one before (its first layer's
    input)."""
    groups, widths = config.get("norm_num_groups"), list(config.get("block_out_channels") or ())
    if not groups or not widths:
        return 1
    return 1 if min(widths[-2:]) // groups >= 2 else 2


def one_value_side(configs, pixels_per_deepest: int) -> int:
    """The largest image side at which one image leaves the deepest level of one of these UNets or ControlNets a
    single pixel of single-channel groups (smallest_deepest_side); 0 where none has such groups (every real model).
    `pixels_per_deepest`: image pixels per pixel of that level."""
    return pixels_per_deepest if any(smallest_deepest_side(config) == 2 for config in configs) else 0


def _single_values(side: int, batch: int, height: int, width: int) -> bool:
    """Whether a UNet call of `batch` images of `height` x `width` leaves single values to its deepest GroupNorm."""
    return bool(side) and batch == 1 and height <= side and width <= side


def check_smallest_shape(side: int, batch: int, height: int, width: int, what: str) -> None:
    """An export's ranges whose smallest shape (`batch` images of `height` x `width`, which its parity check runs)
    would normalise single values (one_value_side `side`): refused before the export, which crashed there."""
    if _single_values(side, batch, height, width):
        raise DiffrtError(f"the smallest shape these ranges give {what}, one {height}x{width} image, leaves its deepest level "
                          f"one pixel, where a GroupNorm with one channel per group has a single value to normalise; start "
                          f"--height or --width above {side} px, or --batch at 2")


def check_one_value_groups(side: int, height: int, width: int, batch: int) -> None:
    """Refuse a UNet call of `batch` images of `height` x `width` that would normalise single values (one_value_side
    `side`): it passed every size check, then raised torch's error from inside the model (a traceback from
    `diffrt generate`, a 500 from `diffrt serve`). Two images or more at once run, CFG's pair among them."""
    if _single_values(side, batch, height, width):
        raise ShapeOutOfRangeError(f"one {height}x{width} image leaves the UNet's deepest level one pixel, where a GroupNorm "
                                   f"with one channel per group has a single value to normalise; ask for a side above {side} "
                                   "px, or 2 images or more at once (classifier-free guidance runs 2)")


@dataclass
class PixelModelInfo:
    """diffrt.json: what diffusers' configs do not say about a pixel-space model."""

    conditioning: Conditioning = "none"
    num_classes: int = 0
    class_embedding_dim: int = 0  # "class_channels" only
    class_names: list[str] = field(default_factory=list)
    training: dict = field(default_factory=dict)  # command, seed, steps, wall time of the run that made it

    @property
    def null_class_label(self) -> int | None:
        return self.num_classes if self.conditioning != "none" else None


class LabelChannelsUNet(nn.Module):
    """Class conditioning by input channels: a learned label embedding, broadcast over the image
    and concatenated to the noisy sample, so the UNet sees the label at every pixel."""

    def __init__(self, unet, num_labels: int, embedding_dim: int):
        super().__init__()
        self.unet = unet
        self.class_embedding = nn.Embedding(num_labels, embedding_dim)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        b, _, h, w = sample.shape
        emb = self.class_embedding(class_labels).view(b, -1, 1, 1).expand(b, -1, h, w).to(sample.dtype)
        return self.unet(torch.cat([sample, emb], dim=1), timestep).sample


class PixelUNet(nn.Module):
    """The `unet` component of a pixel-space model: (sample, timestep[, class_labels]) -> noise_pred,
    whatever the conditioning variant. This module is what the torch backend runs and ONNX exports."""

    def __init__(self, unet, info: PixelModelInfo, class_embedding: nn.Embedding | None = None):
        super().__init__()
        self.info = info
        if info.conditioning == "class_channels":
            self.net = LabelChannelsUNet(unet, info.num_classes + 1, info.class_embedding_dim)
            if class_embedding is not None:
                self.net.class_embedding.load_state_dict(class_embedding.state_dict())
        else:
            self.net = unet

    @property
    def unet(self):
        return self.net.unet if isinstance(self.net, LabelChannelsUNet) else self.net

    @property
    def sample_size(self) -> int:
        size = self.unet.config.sample_size
        return size if isinstance(size, int) else size[0]

    @property
    def out_channels(self) -> int:
        return self.unet.config.out_channels

    @property
    def size_multiple(self) -> int:
        """What every image side must be a multiple of: the UNet halves it once per down block but the
        last, and a side that does not halve exactly mismatches the skip connections."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def one_value_side(self) -> int:
        """one_value_side of this UNet: 0, except for tiny test models."""
        return one_value_side([self.unet.config], self.size_multiple)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.info.conditioning == "class_channels":
            return self.net(sample, timestep, class_labels)
        if self.info.conditioning == "class_embedding":
            return self.net(sample, timestep, class_labels=class_labels).sample
        return self.net(sample, timestep).sample


@dataclass
class PixelModel:
    unet: PixelUNet
    scheduler: DDIMConfig
    folder: Path | None = None

    @property
    def info(self) -> PixelModelInfo:
        return self.unet.info


def small_unet_config(sample_size: int = 16, channels: int = 3, widths=(32, 64, 64), attention: bool = True) -> dict:
    """A UNet2DModel config small enough to train on a laptop CPU in minutes."""
    down = ["DownBlock2D", "AttnDownBlock2D" if attention else "DownBlock2D", "DownBlock2D"][: len(widths)]
    up = ["UpBlock2D", "AttnUpBlock2D" if attention else "UpBlock2D", "UpBlock2D"][: len(widths)]
    return dict(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=list(widths),
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=8,
        attention_head_dim=8,
    )


def build_pixel_model(
    unet_config: dict,
    conditioning: Conditioning = "none",
    num_classes: int = 0,
    class_embedding_dim: int = 4,
    scheduler: DDIMConfig | None = None,
    class_names: list[str] | None = None,
) -> PixelModel:
    """A freshly initialised pixel-space model with the requested conditioning."""
    from diffusers import UNet2DModel

    cfg = dict(unet_config)
    if conditioning != "none" and num_classes < 1:
        raise DiffrtError(f"a class-conditioned model needs num_classes >= 1, got {num_classes}")
    info = PixelModelInfo(conditioning=conditioning, num_classes=num_classes, class_names=list(class_names or []))
    if conditioning == "class_embedding":
        cfg["num_class_embeds"] = num_classes + 1  # + the null label for classifier-free guidance
    elif conditioning == "class_channels":
        cfg["in_channels"] = cfg["in_channels"] + class_embedding_dim
        info.class_embedding_dim = class_embedding_dim
    unet = UNet2DModel(**cfg)
    return PixelModel(PixelUNet(unet, info), scheduler or DDIMConfig(clip_sample=True))


# diffusers' from_pretrained builds the empty model under accelerate's init_empty_weights, which patches nn.Module
# process-wide: two loads at once (pipelines opened from threads) made each other's modules on the meta device (a
# class embedding, a whole model). diffrt's loads take turns, each loader whole (`serialized`); a module that code of
# the caller's own builds in another thread meanwhile is still exposed to that patch.
LOADING = threading.RLock()


def serialized(load):
    """`load` run under LOADING, one diffrt load at a time in the process."""

    @functools.wraps(load)
    def run(*args, **kwargs):
        with LOADING:
            return load(*args, **kwargs)

    return run


@serialized
def load_pixel_model(folder: str | Path, weights: bool = True) -> PixelModel:
    """Load a pixel-space model from a pipeline folder (unet/ + scheduler/) or a bare UNet folder.

    weights=False builds it from its configs on the meta device, reading no weights: its sizes and
    spec at no cost (an export's cache key)."""
    from diffusers import UNet2DModel

    folder, unet_dir = require_pixel_model_dir(folder)
    unet = load_frozen(UNet2DModel, unet_dir, weights)
    info = PixelModelInfo()
    if (folder / DIFFRT_CONFIG).is_file():
        info = read_pixel_info(folder / DIFFRT_CONFIG, unet.config)
    elif unet.config.num_class_embeds:
        # diffusers' config cannot say whether one embedding is a null class; diffrt's trainers keep
        # the last for classifier-free guidance (and write diffrt.json). Say what is assumed.
        n = unet.config.num_class_embeds
        log.warning("%s has no %s: taking class embedding %d of its %d as the null class that classifier-free "
                    "guidance and label dropout use, and 0..%d as its classes", folder, DIFFRT_CONFIG, n - 1, n, n - 2)
        info = PixelModelInfo("class_embedding", num_classes=n - 1)
    # num_classes labels and the null one: a diffrt.json that disagrees with the weights failed only when the null
    # label reached the embedding (IndexError, mid-sampling).
    if info.conditioning == "class_embedding" and unet.config.num_class_embeds != info.num_classes + 1:
        raise DiffrtError(f"{folder / DIFFRT_CONFIG} gives {info.num_classes} classes but the UNet has "
                          f"{unet.config.num_class_embeds} class embeddings; expected {info.num_classes + 1} (one more, the "
                          "null class): restore the file the trainer wrote")
    class_embedding = None
    if info.conditioning == "class_channels" and weights:
        from safetensors.torch import load_file

        path = folder / "class_embedding" / "model.safetensors"
        if not path.is_file():
            raise DiffrtError(f"{path} is missing: a class-channels model keeps its label embedding there; restore it")
        state = load_file(path)
        weight = state.get("weight")
        if set(state) != {"weight"} or weight.ndim != 2 or not weight.is_floating_point() or not weight.numel():
            found = ", ".join(f"{k} {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in state.items()) or "nothing"
            raise DiffrtError(f"{path} holds {found}; a label embedding is one floating-point tensor named weight, "
                              "[classes + 1, dim] (what the trainer writes): restore the file")
        if state["weight"].shape[0] != info.num_classes + 1:
            raise DiffrtError(f"{path} holds {state['weight'].shape[0]} label embeddings but {DIFFRT_CONFIG} gives "
                              f"{info.num_classes} classes; expected {info.num_classes + 1} (one more, the null class)")
        if weight.shape[1] != info.class_embedding_dim:
            raise DiffrtError(f"{path} holds label embeddings of {weight.shape[1]} values but {DIFFRT_CONFIG} gives "
                              f"class_embedding_dim {info.class_embedding_dim}: restore the files the trainer wrote together")
        class_embedding = nn.Embedding(*state["weight"].shape)
        class_embedding.load_state_dict(state)
    scheduler_file = scheduler_config_file(folder)
    scheduler = DDIMConfig.from_scheduler_config(read_config(scheduler_file)) if scheduler_file else DDIMConfig()
    model = PixelModel(PixelUNet(unet, info, class_embedding), scheduler, folder)
    model.unet.eval().requires_grad_(False)
    return model


def require_pixel_model_dir(folder: str | Path) -> tuple[Path, Path]:
    """(folder, its UNet's folder) for a pixel-space model: a pipeline folder (unet/ + scheduler/) or a bare UNet2DModel
    folder, whose config check_pixel_unet_config takes; one line otherwise, before any weight is read."""
    folder = require_model_dir(folder)
    unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    if not (unet_dir / "config.json").is_file():
        raise DiffrtError(f"{folder} has no unet/config.json; expected a diffusers pipeline folder or a UNet2DModel folder")
    check_pixel_unet_config(read_config(unet_dir / "config.json"), unet_dir / "config.json")
    return folder, unet_dir


def read_config(path: Path) -> dict:
    """A model's config.json as a dict, read before any weight; one line if it is not a JSON object."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise DiffrtError(f"{path} is missing; restore the model's config") from None
    except ValueError as exc:
        raise DiffrtError(f"{path} is not valid JSON ({exc}); restore the model's config") from None
    if not isinstance(config, dict):
        raise DiffrtError(f"{path} holds no JSON object; restore the model's config")
    return config


def read_pixel_info(path: Path, unet_config) -> PixelModelInfo:
    """diffrt.json, checked in one line naming the file: its keys and values, and the UNet's inputs against them."""
    data = read_config(path)
    names = {f.name for f in fields(PixelModelInfo)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise DiffrtError(f"{path} has keys diffrt does not write ({', '.join(unknown)}); restore the file the trainer wrote")
    info = PixelModelInfo(**data)
    if info.conditioning not in get_args(Conditioning):
        raise DiffrtError(f"{path}: conditioning {info.conditioning!r} is none of {', '.join(get_args(Conditioning))}; "
                          "restore the file the trainer wrote")
    for key in ("num_classes", "class_embedding_dim"):
        value = getattr(info, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DiffrtError(f"{path}: {key} {value!r} is not a count; restore the file the trainer wrote")
    if info.conditioning == "class_channels":  # the label embedding rides in extra input channels
        expected = unet_config.out_channels + info.class_embedding_dim
        if unet_config.in_channels != expected:
            raise DiffrtError(f"{path} gives class_embedding_dim {info.class_embedding_dim}, so the UNet should take "
                              f"{unet_config.out_channels} + {info.class_embedding_dim} = {expected} input channels; it takes "
                              f"{unet_config.in_channels}: restore the file the trainer wrote")
    return info


def check_pixel_unet_config(config: dict, where: Path) -> None:
    """Refuse, in one line naming the setting, a UNet2DModel that the DDIM loop would run wrongly or
    that fails deep inside on its first call (diffusers' DDIMPipeline fails on each of these too)."""
    if "_class_name" not in config and ("architectures" in config or "model_type" in config):  # a transformers config
        kind = (config.get("architectures") or [config.get("model_type")])[0]
        raise DiffrtError(f"{where} is a transformers {kind} folder, not a UNet2DModel; pass a pixel-space model folder (a "
                          "UNet2DModel), or a text-to-image pipeline's own folder")
    kind = config.get("_class_name", "UNet2DModel")
    if kind != "UNet2DModel":  # e.g. a text-to-image pipeline's unet/ (UNet2DConditionModel) passed on its own
        raise DiffrtError(f"{where} is a {kind}, not a UNet2DModel: pixel-space models take UNet2DModel folders; for a "
                          "text-to-image model pass the pipeline folder (with text_encoder/ and unet/), and train it with "
                          "`diffrt train dreambooth-lora`")
    if config.get("time_embedding_type") == "fourier":
        raise DiffrtError(f"{where}: time_embedding_type 'fourier' is a score-SDE (NCSN++) model that takes noise levels "
                          "sigma, not DDPM timesteps; diffrt samples DDPM/DDIM models (time_embedding_type 'positional')")
    if config.get("class_embed_type") is not None:
        raise DiffrtError(f"{where}: class_embed_type {config['class_embed_type']!r} takes class_labels that are not "
                          "class indices, which diffrt does not feed; use an unconditional UNet or one with num_class_embeds")
    channels_in = config.get("in_channels", 3)
    if config.get("out_channels", 3) == 2 * channels_in:  # (class channels make in_channels the larger, never this)
        raise DiffrtError(f"{where}: out_channels {config['out_channels']} is twice in_channels {channels_in}, a learned "
                          "variance (improved DDPM) that DDIM has no use for; use a model that predicts noise only")


def scheduler_config_file(folder: Path) -> Path | None:
    """The scheduler config of a pipeline folder (scheduler/) or of a bare UNet folder, if it has one."""
    return next((p for p in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json") if p.is_file()), None)


UNCONDITIONAL_PIPELINES = ("DDIMPipeline", "DDPMPipeline")  # diffusers' pipelines over a lone UNet2DModel + scheduler


def save_pixel_model(model: PixelModel, out: str | Path, scheduler_config: dict | None = None,
                     pipeline_class: str = "DDIMPipeline") -> Path:
    """Write a pipeline folder atomically: built in a temporary sibling, then renamed into place.

    `scheduler_config` (a diffusers scheduler config, as read) is written as it is, class and all,
    instead of the DDIMScheduler config of `model.scheduler`: a fine-tuned model keeps the scheduler
    its base came with (a DDPMScheduler's variance_type too). `pipeline_class`, one of
    UNCONDITIONAL_PIPELINES, is the one model_index.json names: a fine-tuned model keeps its base's, as
    diffusers' train_unconditional.py does (DDIMPipeline would turn a DDPMPipeline's scheduler into DDIM)."""
    if pipeline_class not in UNCONDITIONAL_PIPELINES:
        raise ValueError(f"pipeline_class must be one of {UNCONDITIONAL_PIPELINES}, got {pipeline_class!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.make_temp_dir(out.parent, f".{out.name}.")
    try:
        model.unet.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        sched = scheduler_config or {"_class_name": "DDIMScheduler", **model.scheduler.to_scheduler_config()}
        atomic.write_json(tmp / "scheduler" / "scheduler_config.json", sched)
        atomic.write_json(tmp / "model_index.json", {
            "_class_name": pipeline_class,
            "unet": ["diffusers", "UNet2DModel"],
            "scheduler": ["diffusers", sched.get("_class_name") or "DDIMScheduler"],
        })
        atomic.write_json(tmp / DIFFRT_CONFIG, asdict(model.info))
        if model.info.conditioning == "class_channels":
            emb = model.unet.net.class_embedding.state_dict()
            atomic.save_safetensors(tmp / "class_embedding" / "model.safetensors", emb)
        atomic.open_file_modes(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place; an old folder at `dst` is swapped out, then removed."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def require_model_dir(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        what = f"{folder} is a file, not a model folder" if folder.exists() else f"model folder not found: {folder}"
        raise DiffrtError(f"{what}; pass a diffusers model folder (or a Hugging Face Hub id)")
    if not any((folder / name).is_file() for name in ("model_index.json", "config.json")) and not (folder / "unet").is_dir():
        raise DiffrtError(f"{folder} is not a diffusers model folder: it has no model_index.json or config.json")
    return folder


def load_frozen(cls, folder: Path, weights: bool = True) -> nn.Module:
    """`cls.from_pretrained(folder)`, safetensors only, frozen. weights=False: built from its config
    alone on the meta device, reading no weights: enough for its sizes and specs (an export's key).
    Pickled weights are refused either way, before an export hashes them."""
    require_safetensors(folder)
    if weights:
        with LOADING:
            return loaded(folder, *cls.from_pretrained(folder, use_safetensors=True, output_loading_info=True)).eval().requires_grad_(False)
    # torch's device context, which is this thread's: accelerate's init_empty_weights patches nn.Module for the whole
    # process while it builds, and a module another thread made meanwhile came out on the meta device.
    with torch.device("meta"):
        # diffusers models read their config with load_config; transformers ones with their config_class.
        module = cls.from_config(cls.load_config(folder)) if hasattr(cls, "load_config") else cls(cls.config_class.from_pretrained(folder))
    return module.eval().requires_grad_(False)


def loaded(folder: Path, module: nn.Module, info: dict) -> nn.Module:
    """`from_pretrained(..., output_loading_info=True)`'s module, refused where its weights lacked a tensor: left
    uninitialised with a warning, a diffusers model failed at its first use (a meta tensor), a text encoder ran with
    a random layer, silently."""
    missing = [*info.get("missing_keys", ()), *(k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ()))]
    if missing:
        raise DiffrtError(f"{folder}: its weights lack {len(missing)} of the tensors its config.json makes (e.g. "
                          f"{sorted(missing)[0]}); the weights file is damaged or of another model: restore the model")
    return module


def require_safetensors(folder: Path) -> None:
    """Refuse pickled weights: loading them can run arbitrary code (RELIABILITY #12); and a folder holding
    only a variant's weights (`diffusion_pytorch_model.fp16.safetensors`), which from_pretrained without
    `variant=` does not read."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    for index in indexes:  # whether or not main weights sit beside it: diffusers and transformers may take either
        check_shard_index(index)
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    # The main weights: name.safetensors, or shards (name-00001-of-00002.safetensors with their index).
    if any(name.count(".") == 1 for name in found) or indexes:
        return
    if found:
        raise DiffrtError(f"{folder} holds only variant weights ({', '.join(found)}); diffrt loads a model's main weights, as "
                          "diffusers' from_pretrained does without variant=: save the model again without a variant "
                          "(model.save_pretrained(dir))")
    pickled = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]
    if pickled:
        raise DiffrtError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}); convert them to safetensors "
            "(diffusers: model.save_pretrained(dir, safe_serialization=True)) from a source you trust"
        )
    raise DiffrtError(f"{folder} has no *.safetensors weights")


def check_shard_index(index: Path) -> None:
    """A shard index's weight_map names only safetensors files beside it. The loaders open whatever file the index
    names, and one naming `weights.bin` reached torch.load (unpickling) through a folder that passed as safetensors,
    with its weights left out of the export's hash; a `../` name read another model's file."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise DiffrtError(f"{index} is not a shard index ({exc}); save the model again (model.save_pretrained(dir))") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise DiffrtError(f"{index} has no weight_map of tensor names to shard files; save the model again "
                          "(model.save_pretrained(dir))")
    for shard in sorted({str(v) for v in weight_map.values()}):
        if Path(shard).name != shard or shard in ("", ".", "..") or not shard.endswith(".safetensors"):
            raise DiffrtError(f"{index} names {shard!r} as a shard; diffrt loads shards that are .safetensors files in the "
                              "index's own folder: convert the weights to safetensors (model.save_pretrained(dir, "
                              "safe_serialization=True)) from a source you trust")
        if not (index.parent / shard).is_file():
            raise DiffrtError(f"{index} names the shard {shard}, which is not in {index.parent}; restore it or save the "
                              "model again")


def shipped_digits_model() -> PixelModel:
    """The small class-conditioned digits model trained by `diffrt train class-cond` and shipped in the package."""
    if not (SHIPPED_DIGITS / "unet" / "config.json").is_file():
        raise DiffrtError(f"the shipped digits model is missing from {SHIPPED_DIGITS}; reinstall diffrt")
    return load_pixel_model(SHIPPED_DIGITS)
