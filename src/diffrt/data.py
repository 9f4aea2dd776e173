"""Training data: image folders, class folders, and the bundled digits and chelsea (a cat to teach).

Datasets here are in-memory tensors in model space [-1, 1]: the small sets diffrt trains on
fit easily, and a tensor dataset makes batch selection a pure function of (seed, step), which
is what lets `--resume` continue exactly where a run stopped.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from diffrt.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}  # named in messages; Pillow opens more
# Not training data, wherever they are: macOS's resource forks of a zip (a class of their own otherwise).
SKIPPED_FOLDERS = {"__MACOSX"}
# Formats Pillow opens through a plugin diffrt does not install: a line saying so, not "not an image file".
NEEDS_PLUGIN = {".heic": "pillow-heif", ".heif": "pillow-heif", ".avif": "pillow-avif-plugin", ".jxl": "pillow-jxl-plugin"}
# Long side / short side past which an image is cut to its central part of this aspect before it is resized:
# resized to a short side of 512, a 1 x 4000 strip would be 512 x 2,048,000 pixels (12 GB of float32).
MAX_ASPECT = 4
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # R, G, B as Pillow's convert("L") weighs them (ITU-R 601-2)
BUNDLED = ("digits", "chelsea")
# Training images are decoded (JPEGs at a reduced scale) before they are resized: past this many pixels, one line
# instead of gigabytes (a 17 KB PNG can hold a 30000 x 30000 image). 160 MP takes every camera's photos but 200 MP
# phone modes, which Pillow's own decompression-bomb limit (179 MP) refuses too.
MAX_TRAIN_PIXELS = 160_000_000
# (top, left, height, width) of the crops of scikit-image's chelsea (300 x 451) that make the bundled
# "chelsea" subject: four views of one cat, of different sizes and aspect ratios, for fine-tuning
# and DreamBooth examples.
CHELSEA_CROPS = ((0, 0, 300, 300), (40, 120, 200, 260), (20, 60, 120, 90), (100, 200, 180, 240))


@dataclass
class ImageDataset:
    """images: [N, C, H, W] in [-1, 1]; labels: [N] int64 or None.

    Augmentations are drawn anew on every draw from the step's generator: a tint, a mirror image,
    and, where `uncropped` holds the images resized to a short side of H, a random H x W crop of
    each (then `images` holds their centre crops, which give the dataset its shape).
    """

    images: torch.Tensor
    labels: torch.Tensor | None = None
    class_names: list[str] = field(default_factory=list)
    random_tint: bool = False
    random_flip: bool = False
    uncropped: list[torch.Tensor] | None = None
    # A folder's: the sha256 of the image files read, by path within it (data_content); None for a bundled set.
    content: str | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def batch(self, indices: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch at `indices`, with this draw's augmentations taken from `generator`."""
        if self.uncropped is None:
            x = self.images[indices]
        else:
            size = self.images.shape[-1]
            x = torch.stack([random_crop(self.uncropped[i], size, generator) for i in indices.tolist()])
        if self.random_tint:
            # Digits are white strokes on black: multiply by a colour whose brightest channel is 1.
            rgb = random_colours(len(indices), generator)
            x = (x + 1) / 2 * rgb.view(-1, 3, 1, 1) * 2 - 1
        if self.random_flip:
            flip = torch.rand(len(indices), generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        y = self.labels[indices] if self.labels is not None else None
        return x, y

    def head(self, n: int) -> ImageDataset:
        """The first n images."""
        return replace(self, images=self.images[:n], labels=None if self.labels is None else self.labels[:n],
                       uncropped=None if self.uncropped is None else self.uncropped[:n], content=None)

    def to_grey(self) -> ImageDataset:
        """One channel, the luma of the RGB ones as Pillow's convert("L") weighs them (ITU-R 601-2: a red is darker
        than a green); the weights sum to 1, so [-1, 1] stays [-1, 1]. A tint needs three, so it is switched off."""
        uncropped = None if self.uncropped is None else [luma(x.unsqueeze(0))[0] for x in self.uncropped]
        return replace(self, images=luma(self.images), uncropped=uncropped, random_tint=False)


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 1, H, W]: 0.299 R + 0.587 G + 0.114 B, Pillow's "L"."""
    weights = torch.tensor(LUMA_WEIGHTS, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return (rgb * weights).sum(dim=1, keepdim=True)


def random_colours(n: int, generator: torch.Generator) -> torch.Tensor:
    """n colours of random hue and saturation in [0.35, 1], at full value (brightest channel 1)."""
    hue = torch.rand(n, generator=generator)
    sat = 0.35 + 0.65 * torch.rand(n, generator=generator)
    # HSV -> RGB with V = 1: channel k is 1 - S * clamp(min(m, 4 - m), 0, 1), m = (k + 6H) mod 6.
    k = torch.tensor([5.0, 3.0, 1.0])
    m = (k[None, :] + 6 * hue[:, None]) % 6
    return 1 - sat[:, None] * torch.clamp(torch.minimum(m, 4 - m), 0, 1)


def load_digits(size: int = 16, split: str = "train") -> ImageDataset:
    """scikit-learn's 1797 real 8x8 handwritten digits, upsampled to `size` and tinted per draw.

    split "train" is 80 % of each class, "holdout" the other 20 %: the quality check trains its
    classifier on the hold-out split, which the diffusion model never sees.
    """
    if split not in ("train", "holdout"):  # anything else read as "train": a quality check on the training data
        raise DataError(f"split must be 'train' or 'holdout', got {split!r}")
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise DataError("the bundled digits need scikit-learn: pip install scikit-learn") from None
    if size < 8:
        raise DataError(f"digits are 8x8; pick a size >= 8, got {size}")
    digits = sk_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    holdout = digits_holdout_mask(labels)
    keep = holdout if split == "holdout" else ~holdout
    images = F.interpolate(images[keep], size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    images = images.expand(-1, 3, -1, -1) * 2 - 1
    return ImageDataset(images.contiguous(), labels[keep], [str(i) for i in range(10)], random_tint=True)


def digits_holdout_mask(labels: torch.Tensor) -> torch.Tensor:
    """Every fifth sample of each class, a split fixed by the data alone."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for c in labels.unique():
        (idx,) = torch.nonzero(labels == c, as_tuple=True)
        mask[idx[::5]] = True
    return mask


def image_suffixes() -> set[str]:
    """The file suffixes Pillow can open here (.jfif, .jpe and .ppm as well as IMAGE_SUFFIXES)."""
    from PIL import Image

    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN} | IMAGE_SUFFIXES


def _visible(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not p.name.startswith(".") and p.name not in SKIPPED_FOLDERS]


def list_images(folder: Path) -> list[Path]:
    """The image files in `folder` and its sub-folders, sorted by path (as torchvision's ImageFolder and the Hub's
    imagefolder find them: a photo under 2023/ is not left out). Any other visible file is an error, not something
    to skip quietly (a stray .heic or .txt would otherwise shrink the dataset without a word). Linked folders are
    followed, each once."""
    suffixes, files, seen, todo = image_suffixes(), [], set(), [folder]
    while todo:
        here = todo.pop()
        real = os.path.realpath(here)
        if real in seen:  # a link back up the tree would walk forever
            continue
        seen.add(real)
        for p in _visible(here):
            if p.is_symlink() and not p.exists():
                raise DataError(f"{p} is a link to nothing (it points to {p.readlink()}); fix or remove it")
            if p.is_dir():
                todo.append(p)
            elif p.suffix.lower() in NEEDS_PLUGIN and p.suffix.lower() not in suffixes:  # Pillow 11.3+ opens AVIF itself
                raise DataError(f"{p} is {p.suffix[1:].upper()}, which Pillow opens only with the {NEEDS_PLUGIN[p.suffix.lower()]} "
                                "plugin; convert it to JPEG or PNG")
            elif p.suffix.lower() not in suffixes:
                raise DataError(f"{p} is not an image file (expected {', '.join(sorted(IMAGE_SUFFIXES))} or another format "
                                "Pillow opens); remove it or move it out of the data folder")
            else:
                files.append(p)
    return sorted(files, key=lambda p: p.relative_to(folder).parts)


def data_content(folder: Path, files: list[Path]) -> str:
    """What a checkpoint records of a data folder's images, so that `--resume` can tell the same data from other
    images under the same names and count (replaced, edited): a sha256 over each file's path within `folder` and
    its bytes' sha256 (atomic.sha256_file, which remembers large files), shortened."""
    from diffrt import atomic

    digest = hashlib.sha256()
    for path in files:
        # The name's bytes as the file system holds them: a name that is not UTF-8 (a Latin-1 zip) has no str encoding
        digest.update(os.fsencode(path.relative_to(folder).as_posix()) + f"\0{atomic.sha256_file(path)}\n".encode())
    return digest.hexdigest()[:16]


def check_out_outside(out: str | Path, source: str | None, flag: str = "--data") -> None:
    """Refuse an --out at or inside a data folder: the run's checkpoints, logs and sample grids would be found
    among its images (sub-folders are read), and the next run or --resume would stop at its loss.csv."""
    if source is None or not Path(source).is_dir():
        return
    folder, where = Path(source).resolve(), Path(out).resolve()
    if where == folder or folder in where.parents:
        raise DataError(f"--out {out} is {'' if where == folder else 'inside '}the {flag} folder {source}: the run's "
                        "checkpoints and samples would be read as training images; pass an --out outside it")


def _require_folder(folder: str | Path) -> Path:
    if not str(folder).strip():  # Path("") is the current folder
        raise DataError(f"the data folder is an empty path; pass a folder of images or one of: {', '.join(BUNDLED)}")
    folder = Path(folder)
    if not folder.is_dir():
        what = f"{folder} is a file, not a data folder" if folder.exists() else f"data folder not found: {folder}"
        raise DataError(f"{what}; pass a folder of images or one of: {', '.join(BUNDLED)}")
    return folder


def _load_images(files: list[Path], size: int, crop: str) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Each file decoded near the size it is resized to, and resized before the next is read: memory for one
    full-size image at a time, not for the folder's (twenty 12 MP photos are 2.9 GB of float32)."""
    from tqdm.auto import tqdm

    from diffrt.images import load_image

    files = tqdm(files, desc="loading images", unit="image", disable=len(files) < 100)
    images = ((path, load_image(path, max_pixels=MAX_TRAIN_PIXELS, min_side=size)) for path in files)
    return _prepare(images, size, crop)


def _prepare(images: Iterable[tuple[object, torch.Tensor]], size: int, crop: str) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """(name, [C, H, W] in [0, 1]) pairs -> the centre crops [N, C, size, size] in [-1, 1], and for crop
    "random" the resized images to crop from on each draw. `images` may be a generator: each is
    resized (and, for crop "center", cropped) as it comes, so only the crops are kept."""
    centre, resized = [], []
    for name, img in images:
        img = resize_short_side(central_part(img, name, crop), size) * 2 - 1
        centre.append(center_crop(img, size))
        if crop == "random":
            resized.append(img)
    return torch.stack(centre), resized if crop == "random" else None


def central_part(img: torch.Tensor, name: object, crop: str) -> torch.Tensor:
    """`img` [C, H, W] cut to its central MAX_ASPECT : 1 part when it is longer than that, so that resizing its
    short side never makes a giant image. The centre crop lies inside that part; random crops are drawn from
    it (said once per image)."""
    _, h, w = img.shape
    long, short = max(h, w), min(h, w)
    if long <= MAX_ASPECT * short:
        return img
    keep = MAX_ASPECT * short
    if crop == "random":
        log.warning("%s is %dx%d pixels: random crops are drawn from its central %d:1 part (%d pixels of %d)",
                    name, w, h, MAX_ASPECT, keep, long)
    start = (long - keep) // 2
    return img[:, start : start + keep] if h > w else img[:, :, start : start + keep]


def chelsea_crops() -> list[torch.Tensor]:
    """The bundled "chelsea" subject: CHELSEA_CROPS of scikit-image's cat photo, [3, H, W] in [0, 1]."""
    try:
        from skimage import data
    except ImportError:
        raise DataError("the bundled 'chelsea' images come from scikit-image; pip install scikit-image") from None
    cat = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float() / 255
    return [cat[:, top : top + h, left : left + w] for top, left, h, w in CHELSEA_CROPS]


def resize_short_side(img: torch.Tensor, size: int) -> torch.Tensor:
    """[C, H, W] resized so that its short side is `size` (antialiased bicubic), values kept in [0, 1]."""
    _, h, w = img.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    return F.interpolate(img[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0].clamp(0, 1)


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    _, h, w = img.shape
    top, left = (h - size) // 2, (w - size) // 2
    return img[:, top : top + size, left : left + size]


def random_crop(img: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    _, h, w = img.shape
    top = int(torch.randint(h - size + 1, (1,), generator=generator))
    left = int(torch.randint(w - size + 1, (1,), generator=generator))
    return img[:, top : top + size, left : left + size]


def load_image_folder(folder: str | Path, size: int, crop: str = "center", random_flip: bool = False,
                      limit: int | None = None) -> ImageDataset:
    """Every image in `folder` (and its sub-folders), resized and cropped to size x size, as RGB; with `limit`,
    the first that many (the others are not read)."""
    folder = _require_folder(folder)
    files = list_images(folder)[:limit]
    if not files:
        raise DataError(f"no images in {folder}; expected files ending in {', '.join(sorted(IMAGE_SUFFIXES))}")
    images, uncropped = _load_images(files, size, crop)
    return ImageDataset(images, random_flip=random_flip, uncropped=uncropped, content=data_content(folder, files))


def class_order(names: list[str], model_names: list[str] | None = None) -> list[str]:
    """The label order of class folders: a model's own order when it names the same classes (fine-tuning keeps
    each label's class), numeric when every name is a number (10 after 9, not after 1), else by name as
    torchvision's ImageFolder orders them."""
    if model_names and sorted(model_names) == sorted(names):
        return list(model_names)
    if all(n.isdecimal() for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def load_class_folders(folder: str | Path, size: int, crop: str = "center", random_flip: bool = False,
                       model_names: list[str] | None = None) -> ImageDataset:
    """One sub-folder per class (label order: class_order), images inside each (and in its sub-folders)."""
    folder = _require_folder(folder)
    entries = _visible(folder)
    dangling = [p for p in entries if p.is_symlink() and not p.exists()]
    if dangling:  # a class folder on a share not mounted: left out, every later class's label would shift
        raise DataError(f"{dangling[0]} is a link to nothing (it points to {dangling[0].readlink()}); mount or restore it, or "
                        "remove the link")
    loose = [p for p in entries if not p.is_dir()]
    suffixes = image_suffixes()
    images = [p for p in loose if p.suffix.lower() in suffixes]
    if images:  # an image of no class: a mistake, not a dataset's README, LICENSE or labels.csv
        raise DataError(f"{images[0]} lies beside the class folders of {folder}, in no class; move it into its class's "
                        "folder or out of the dataset")
    if loose:
        log.info("%s: not class folders, left out: %s", folder, ", ".join(p.name for p in loose))
    entries = [p for p in entries if p.is_dir()]
    if not entries:
        raise DataError(f"{folder} has no class sub-folders; expected one folder of images per class")
    names = class_order([p.name for p in entries], model_names)
    log.info("classes of %s: %s", folder, ", ".join(f"{i}={n}" for i, n in enumerate(names)))
    classes = [folder / n for n in names]
    images, uncropped, labels, read = [], [], [], []
    for label, sub in enumerate(classes):
        files = list_images(sub)
        read += files
        if not files:
            raise DataError(f"class folder {sub} has no images; add images of that class or remove the folder")
        centre, resized = _load_images(files, size, crop)
        images.append(centre)
        uncropped += resized or []
        labels += [label] * len(files)
    return ImageDataset(torch.cat(images), torch.tensor(labels), [p.name for p in classes], random_flip=random_flip,
                        uncropped=uncropped if crop == "random" else None, content=data_content(folder, read))


def load_source(source: str, size: int, labelled: bool, crop: str = "center", random_flip: bool = False,
                model_names: list[str] | None = None) -> ImageDataset:
    """A bundled dataset by name, or a folder (of images for unlabelled, class sub-folders for labelled, in the
    order of `model_names` where they name the same classes). A folder named like a bundled set wins, as a local
    folder wins over a Hub id (hub.py), and says so."""
    bundled = source in BUNDLED and not Path(source).is_dir()
    if source in BUNDLED and not bundled:
        log.warning("--data %s: using the folder %s, not the bundled set of that name (give ./%s's images another folder "
                    "name to train on the bundled one)", source, Path(source).resolve(), source)
    if bundled and source == "digits":
        if random_flip or crop != "center":
            raise DataError("--random-flip and --crop apply to image folders and 'chelsea'; the bundled digits are drawn "
                            "at the model's size, and a mirrored digit is another symbol: leave them out for --data digits")
        return load_digits(size=size)
    if bundled and source == "chelsea":
        if labelled:
            raise DataError("'chelsea' is one subject, not classes; give a folder with one sub-folder per class")
        images, uncropped = _prepare(enumerate(chelsea_crops()), size, crop)
        return ImageDataset(images, random_flip=random_flip, uncropped=uncropped)
    if labelled:
        return load_class_folders(source, size, crop, random_flip, model_names)
    return load_image_folder(source, size, crop, random_flip)
