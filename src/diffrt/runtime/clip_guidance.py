"""CLIP guidance: pull images toward a text prompt by the gradient of a CLIP similarity loss.

    loss(images) = sum over the batch of 1 - cos(image_embeds, text_embeds)

as the CLIP-guided sampling of the Hugging Face diffusion course (unit 2) steers, though the course's loss is the
squared great-circle distance 2 arcsin(|a - b| / 2)^2 of the normalised embeddings: a monotone function of the same
cosine, with another gradient size (scales are not interchangeable between the two). The CLIPModel and its
processor come from a LOCAL folder (`save_pretrained` layout); nothing is downloaded. The
processor's resize, centre crop and normalisation are redone in torch so the loss is
differentiable in the images; the text embedding is computed once.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from diffrt.errors import DiffrtError
from diffrt.models import require_safetensors, serialized
from diffrt.runtime.guidance import Guidance, GuidanceMode


@serialized  # as diffrt's other loads (models.LOADING): one at a time in the process
def load_clip(folder: str | Path, device: str | torch.device = "cpu"):
    """(CLIPModel, CLIPProcessor) from a local folder, fp32, eval, frozen."""
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise DiffrtError(f"{folder} is not a CLIP model folder (no config.json); pass a local CLIPModel folder "
                          "saved with save_pretrained (model + processor); nothing is downloaded")
    if not any(folder.glob("*.safetensors")):
        raise DiffrtError(f"{folder} has no *.safetensors weights; diffrt loads CLIP from safetensors only")
    require_safetensors(folder)  # a shard index naming pickles, a variant only
    model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).to(device).eval().requires_grad_(False)
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    return model, processor


def _size(value, key: str, default: int | None = None) -> int | None:
    """A field of the processor's size dicts (a dict in older transformers, a SizeDict in newer)."""
    if value is None:
        return default
    if isinstance(value, int):
        return value
    got = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
    return got if got is not None else default


def _features(output) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output whose pooler_output is projected (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipLoss:
    """Differentiable CLIP loss of images [B, 3, H, W] toward one text (the prediction of x0 mapped to [0, 1], not
    clamped: see guidance.ImageLoss)."""

    def __init__(self, model, processor, prompt: str):
        self.model = model
        ip = processor.image_processor
        crop = getattr(ip, "crop_size", None)
        self.crop = (_size(crop, "height", 224), _size(crop, "width", 224))
        size = getattr(ip, "size", None)
        # {shortest_edge}: the short side resized to it, the long one in proportion; {height, width}: stretched to it.
        self.shortest_edge = _size(size, "shortest_edge")
        self.resize_to = (_size(size, "height", self.crop[0]), _size(size, "width", self.crop[1]))
        if self.shortest_edge is None and _size(size, "height") is None:
            self.shortest_edge = min(self.crop)
        self.do_center_crop = bool(getattr(ip, "do_center_crop", True))
        device = next(model.parameters()).device
        self.mean = torch.tensor(ip.image_mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(ip.image_std, device=device).view(1, -1, 1, 1)
        tokens = processor.tokenizer([prompt], padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            text = _features(model.get_text_features(input_ids=tokens.input_ids.to(device),
                                                     attention_mask=tokens.attention_mask.to(device)))
        self.text_embeds = F.normalize(text.float(), dim=-1)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """The processor's resize (shortest edge, or to its height x width; bicubic), centre crop and normalisation,
        in torch.

        The long side is truncated, int(edge * long / short), as transformers' get_resize_output_image_size
        does: rounding it would shift the centre crop by a pixel for some aspect ratios. antialias=True
        always: torch's antialiased bicubic is PIL's (a = -0.5) when upsampling too, where the plain one
        (a = -0.75) is not, and small images are upsampled to CLIP's size."""
        h, w = images.shape[-2:]
        if self.shortest_edge is None:
            size = self.resize_to
        else:
            edge = self.shortest_edge
            size = (edge, int(edge * w / h)) if h <= w else (int(edge * h / w), edge)
        if self.do_center_crop:  # never below the crop: the processor would pad there
            size = (max(self.crop[0], size[0]), max(self.crop[1], size[1]))
        x = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
        if self.do_center_crop:
            top, left = (size[0] - self.crop[0]) // 2, (size[1] - self.crop[1]) // 2
            x = x[..., top : top + self.crop[0], left : left + self.crop[1]]
        return (x - self.mean) / self.std

    def per_image(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        embeds = _features(self.model.get_image_features(pixel_values=self.pixel_values(images.to(param.device, param.dtype))))
        cosine = (F.normalize(embeds.float(), dim=-1) * self.text_embeds).sum(-1)
        return (1 - cosine).to(images.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # Summed over the batch, like color_loss: each image's gradient does not depend on the batch size.
        return self.per_image(images).sum()


def clip_guidance(clip_model_dir: str | Path, prompt: str, scale: float, *, every: int = 1, mode: GuidanceMode = "x0",
                  device: str | torch.device | None = None) -> Guidance:
    """Guidance toward `prompt` with the CLIPModel in `clip_model_dir` (a local folder), on `device` (None: CUDA when
    torch sees a GPU, as the pipelines default; CLIP on another device than the images costs a copy each guided step)."""
    from diffrt.runtime.backends import resolve_device

    if not prompt:
        raise DiffrtError("CLIP guidance needs a non-empty prompt")
    model, processor = load_clip(clip_model_dir, resolve_device(device, "torch"))
    return Guidance(ClipLoss(model, processor, prompt), scale, every, mode, name="clip")
