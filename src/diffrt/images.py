"""Conversions between image tensors, arrays, PIL images and PNG grids."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

from diffrt import atomic


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> [0, 1], clamped (as diffusers' VaeImageProcessor.denormalize)."""
    return (images / 2 + 0.5).clamp(0, 1)


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [0, 1] -> float32 [N, H, W, C]."""
    return images.detach().float().cpu().permute(0, 2, 3, 1).numpy().astype(np.float32)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [0, 1] -> uint8 [N, H, W, C], rounded to nearest (what PNGs and PIL images hold); a value
    rounding put past either end is clipped there (uint8 would wrap -0.001 to white)."""
    return (to_numpy(images) * 255).round().clip(0, 255).astype(np.uint8)


def to_pil(images: torch.Tensor) -> list:
    return [array_to_pil(a) for a in to_uint8(images)]


def array_to_pil(array: np.ndarray):
    """uint8 [H, W, C] -> a PIL image (greyscale for one channel)."""
    from PIL import Image

    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2, scale: int = 1) -> torch.Tensor:
    """Tile [N, C, H, W] images in [0, 1] into one [C, H', W'] image, `nrow` images per row."""
    n, c, h, w = images.shape
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
        h, w = h * scale, w * scale
    rows = (n + nrow - 1) // nrow
    grid = torch.ones(c, rows * (h + padding) + padding, nrow * (w + padding) + padding, dtype=images.dtype)
    for i, img in enumerate(images.detach().cpu()):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = img
    return grid


def png_bytes(image: torch.Tensor) -> bytes:
    """[C, H, W] in [0, 1] -> PNG bytes."""
    return array_png_bytes(to_uint8(image.unsqueeze(0))[0])


def array_png_bytes(array: np.ndarray) -> bytes:
    """uint8 [H, W, C] -> PNG bytes."""
    buf = io.BytesIO()
    array_to_pil(array).save(buf, format="PNG")
    return buf.getvalue()


def save_grid(path: str | os.PathLike, images: torch.Tensor, nrow: int, scale: int = 1) -> Path:
    """Write a PNG grid atomically and return its path."""
    path = Path(path)
    atomic.write_bytes(path, png_bytes(make_grid(images, nrow=nrow, scale=scale)))
    return path


Size = tuple[int | None, int | None]  # (height, width); a side left None is the image's own
MAX_IMAGE_FILE_BYTES = 2 << 30  # bytes: read whole before decoding; larger is no image diffrt decodes (MAX_TRAIN_PIXELS)


def load_image(path: str | os.PathLike, size: Size | None = None, mode: str = "RGB", multiple: int = 1,
               max_pixels: int | None = None, min_side: int | None = None, formats: tuple[str, ...] | None = None,
               name: str | None = None) -> torch.Tensor:
    """Read an image file into [C, H, W] float in [0, 1], optionally resized (decode_image). `name`: what a refusal
    calls the file (default: its path; the demo's uploads go by their own name, not the server's temporary path)."""
    from diffrt.errors import DataError

    path = Path(path)
    name = str(path) if name is None else name
    if not path.is_file():
        raise DataError(f"{name} is a folder; pass an image file" if path.is_dir() else f"image file not found: {name}")
    size_bytes = path.stat().st_size
    if size_bytes > MAX_IMAGE_FILE_BYTES:  # read whole below: a sparse 100 GB file would have been read into memory
        raise DataError(f"{name} is {size_bytes / 2**20:.0f} MiB; image files over {MAX_IMAGE_FILE_BYTES / 2**20:.0f} MiB "
                        "are refused (a 160-MP 16-bit TIFF is about 1 GB): reduce it first")
    return decode_image(path.read_bytes(), size, mode, name=name, multiple=multiple, max_pixels=max_pixels, min_side=min_side,
                        formats=formats)


def _target_size(im, size: Size | None, multiple: int) -> tuple[int, int] | None:
    """(height, width) to resize `im` to, None to keep it: the sides given, the others the image's own rounded
    down to `multiple` (one smaller than `multiple` keeps its size, for the pipeline to name), as diffusers'
    get_default_height_width."""
    height, width = size if size is not None else (None, None)
    target = (height or im.height - im.height % multiple or im.height, width or im.width - im.width % multiple or im.width)
    return None if target == (im.height, im.width) else target


# Formats whose Pillow plugin hands the file to another program: EPS (Ghostscript, an interpreter with a history of
# code-execution bugs). A file a user or a client sends is never given to it.
NOT_OPENED = frozenset({"EPS"})
WEB_FORMATS = ("PNG", "JPEG", "WEBP")  # what a client of a service sends (decode_image's `formats`)


def _openable_formats() -> list[str]:
    """Every format Pillow (and a registered plugin: HEIF, AVIF, JPEG XL) opens, but NOT_OPENED."""
    from PIL import Image

    Image.init()
    return sorted(set(Image.OPEN) - NOT_OPENED)


REDUCE_ABOVE = 16_000_000  # pixels: smaller images decode exactly (12 MP is 144 MB of float32, one image at a time)
HIGH_DEPTH = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def _high_depth(im, size: tuple[int, int] | None, factor: int = 1, name: str = "the image") -> np.ndarray:
    """A 16-bit (or 32-bit int, taken as 16-bit as PNG stores it) or float greyscale image as
    [H, W, 1] float in [0, 1], resized (or shrunk by a whole `factor`, box-filtered) in float so no
    precision is lost first. Pixels outside that range (a float TIFF in 0-255, HDR values, a 32-bit
    count) are refused: clipped, they read as a white or black image without a word."""
    from PIL import Image

    from diffrt.errors import DataError

    raw = np.asarray(im, dtype=np.float32)
    top = HIGH_DEPTH[im.mode]
    low, high = (float(raw.min()), float(raw.max())) if raw.size else (0.0, 0.0)
    if not (np.isfinite(low) and np.isfinite(high) and 0 <= low and high <= top):
        kind = "a 32-bit float" if im.mode == "F" else "a 16/32-bit integer"
        raise DataError(f"{name} is {kind} greyscale image with values from {low:g} to {high:g}; diffrt reads such pixels "
                        f"as 0 to {top:g}: rescale it to that range, or save it as an 8-bit image")
    array = raw / top
    if factor >= 2:
        array = np.asarray(Image.fromarray(array, mode="F").reduce(factor), dtype=np.float32)
    if size is not None:
        array = np.asarray(Image.fromarray(array, mode="F").resize((size[1], size[0]), Image.LANCZOS), dtype=np.float32)
        array = np.clip(array, 0.0, 1.0)
    return array[..., None]


def _taken_sides(im, size: Size | None) -> list[int]:
    """The sides of `im`, upright as its EXIF orientation shows it, that the output takes (those `size` leaves None),
    read from the header alone."""
    height, width = (im.width, im.height) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (im.height, im.width)
    wanted = size if size is not None else (None, None)
    return [side for side, given in zip((height, width), wanted) if given is None]


def _shrink_factor(im, min_side: int) -> int:
    """The whole factor an image may shrink by and keep its short side at 4 x `min_side` or more."""
    return min(im.size) // (4 * min_side)


def decode_image(data: bytes, size: Size | None = None, mode: str = "RGB", *, name: str = "the image",
                 max_pixels: int | None = None, multiple: int = 1, min_side: int | None = None,
                 max_side: int | None = None, formats: tuple[str, ...] | None = None) -> torch.Tensor:
    """Encoded image bytes (PNG, JPEG, ...) -> [C, H, W] float in [0, 1], resized as diffusers' VaeImageProcessor
    resizes a PIL image (Lanczos): to `size` (height, width), a side left None being the image's own rounded down to
    `multiple` (the VAE's factor for a pipeline's images), so `diffrt generate` and `serve` give a file the images the
    Python API and diffusers give the same image opened with PIL.
    `max_pixels` refuses larger images before their pixels are decoded (a small PNG can hold a huge image).
    `min_side` (with no `size`): the caller resizes to a short side of that many pixels, so an image over
    REDUCE_ABOVE pixels whose short side is 8x that or more is reduced while decoding (a JPEG decoded at 1/2, 1/4 or 1/8 scale, then any format
    shrunk by a whole factor, box-filtered), never below 4x: its float pixels take a fraction of the memory, and
    the caller's antialiased resize still does the final step.
    `max_side`: refuse, before decoding, an image that would give a side (height or width not in `size`) larger
    than this (a service's largest side: a 4096 x 4096 PNG of 58 KB was decoded, 525 MB, then refused).
    `formats`: the Pillow formats taken (None: every one but NOT_OPENED). A service takes WEB_FORMATS only: Pillow's
    ICO and ICNS plugins decode the PNG they embed while opening, before any size can be checked (a 560 KB icon
    whose header says 16x16 held a 12000 x 12000 image, 570 MB decoded per request)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from diffrt.errors import DataError

    if not data:
        raise DataError(f"{name} is empty (0 bytes); remove it or copy the image again")
    try:
        with Image.open(io.BytesIO(data), formats=list(formats) if formats is not None else _openable_formats()) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise DataError(f"{name} is {im.width}x{im.height} pixels; the limit is {max_pixels:,} pixels: downscale it")
            if max_side is not None and max(_taken_sides(im, size), default=0) > max_side:
                raise DataError(f"{name} is {im.width}x{im.height} pixels, more than the largest side here ({max_side}); "
                                "send a smaller image, or height and width to resize it to")
            reduce = bool(min_side) and size is None and im.width * im.height > REDUCE_ABOVE
            factor = _shrink_factor(im, min_side) if reduce else 1
            if factor >= 2:
                im.draft(im.mode, (im.width // factor, im.height // factor))  # JPEG: decode at a reduced scale; others: no-op
            # Upright as it is shown: a phone photo stores its pixels sideways plus an EXIF
            # orientation (diffusers' load_image and its DreamBooth script transpose the same way).
            im = ImageOps.exif_transpose(im)
            size = _target_size(im, size, multiple)
            if im.mode in HIGH_DEPTH:  # 16-bit or float greyscale: convert() would clip it at 255
                array = _high_depth(im, size, _shrink_factor(im, min_side) if reduce else 1, name)
                array = np.repeat(array, 3, axis=2) if mode == "RGB" else array
            else:
                im = im.convert(mode)
                factor = _shrink_factor(im, min_side) if reduce else 1  # what the JPEG draft left to do, or all of it
                if factor >= 2:
                    im = im.reduce(factor)
                if size is not None:
                    im = im.resize((size[1], size[0]), Image.LANCZOS)
                array = np.asarray(im, dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        if formats is not None:  # Pillow may know it (BMP, GIF, TIFF): this caller takes these only
            raise DataError(f"{name} is not a readable image of the formats taken here ({', '.join(formats)}); convert "
                            f"it to {'/'.join(formats)}") from None
        raise DataError(f"{name} is not a readable image (not a format Pillow knows); convert it to PNG/JPEG") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # Pillow reports damaged files as OSError, ValueError ("Truncated IHDR chunk", a text chunk
        # past its limit) or SyntaxError ("broken PNG file"): all are the file's fault, not the caller's.
        raise DataError(f"{name} is not a readable image ({exc}); remove it or convert it to PNG/JPEG") from None
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
