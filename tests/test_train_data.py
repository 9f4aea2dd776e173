"""What a training step draws: random crops per draw, and label dropout for classifier-free guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffrt.data import ImageDataset, load_class_folders, load_image_folder
from diffrt.models import build_pixel_model, small_unet_config
from diffrt.runtime.ddim import DDIMConfig
from diffrt.train.pixel import pixel_loss_fn


@pytest.fixture
def wide_folder(tmp_path):
    """One 8 x 16 image of noise: a short side of 8 leaves 9 horizontal crop offsets."""
    pixels = torch.randint(0, 256, (8, 16, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(tmp_path / "wide.png")
    return tmp_path


def draws(dataset: ImageDataset, n: int, seed: int) -> torch.Tensor:
    x, _ = dataset.batch(torch.zeros(n, dtype=torch.long), torch.Generator().manual_seed(seed))
    return x


def test_random_crop_is_drawn_anew_each_time(wide_folder):
    dataset = load_image_folder(wide_folder, 8, crop="random")
    assert dataset.images.shape == (1, 3, 8, 8)
    x = draws(dataset, 8, seed=0)
    assert x.shape == (8, 3, 8, 8)
    assert len({tuple(img.flatten().tolist()) for img in x}) > 1  # one image, several crops
    torch.testing.assert_close(draws(dataset, 8, seed=0), x, rtol=0, atol=0)  # a pure function of the generator
    # A crop of the resized image: somewhere along its width, full height.
    full = dataset.uncropped[0]
    assert any(torch.equal(x[0], full[:, :, left : left + 8]) for left in range(full.shape[-1] - 7))


def test_center_crop_is_deterministic(wide_folder):
    dataset = load_image_folder(wide_folder, 8, crop="center")
    assert dataset.uncropped is None
    # Built apart from diffrt's loader: the file's pixels in [-1, 1], its middle 8 of 16 columns
    # (the short side is already 8, so no resize).
    with Image.open(wide_folder / "wide.png") as im:
        pixels = torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1).float()
    want = (pixels / 255 * 2 - 1)[:, :, 4:12]
    x = torch.cat([draws(dataset, 4, seed=0), draws(dataset, 4, seed=1)])
    for img in x:
        assert torch.equal(img, want)


def test_random_crop_in_class_folders_keeps_labels(wide_folder, tmp_path):
    """Each crop comes from the image its label belongs to: the two classes' images differ (the first is the noise
    image, the second its negative), so a crop of the other class's image would be told apart."""
    root = tmp_path / "classes"
    with Image.open(wide_folder / "wide.png") as im:
        pixels = np.asarray(im.convert("RGB"))
    for name, image in (("a", pixels), ("b", 255 - pixels)):
        (root / name).mkdir(parents=True)
        Image.fromarray(image).save(root / name / "x.png")
    dataset = load_class_folders(root, 8, crop="random")
    assert len(dataset.uncropped) == 2 and dataset.class_names == ["a", "b"]
    indices = torch.tensor([1, 0, 1, 1, 0])
    x, y = dataset.batch(indices, torch.Generator().manual_seed(0))
    assert y.tolist() == [1, 0, 1, 1, 0]
    for crop, i in zip(x, indices.tolist()):
        full = dataset.uncropped[i]
        assert any(torch.equal(crop, full[:, :, left : left + 8]) for left in range(full.shape[-1] - 7))
    grey = dataset.to_grey()
    assert grey.images.shape == (2, 1, 8, 8) and grey.uncropped[0].shape[0] == 1 and draws(grey, 2, 0).shape[1] == 1


def test_grey_is_the_luma_pillow_gives(tmp_path):
    """A one-channel model's images are the RGB ones in grey as Pillow's convert("L") makes them: the plain mean of
    R, G and B made a pure red -0.33 where Pillow's luma gives about -0.40."""
    from PIL import Image

    from diffrt.data import load_image_folder

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 120, 40)]
    for i, colour in enumerate(colours):
        Image.new("RGB", (8, 8), colour).save(tmp_path / f"{i}.png")
    grey = load_image_folder(tmp_path, 8).to_grey()
    want = torch.tensor([Image.new("RGB", (1, 1), c).convert("L").getpixel((0, 0)) / 127.5 - 1 for c in colours])
    assert torch.allclose(grey.images[:, 0, 0, 0], want, atol=1 / 127.5)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_label_dropout_share(p, monkeypatch):
    """The share of labels set to the null label is about p, and exactly 0 for p = 0."""
    torch.manual_seed(0)
    model = build_pixel_model(small_unet_config(8, 3, (16, 32)), conditioning="class_embedding", num_classes=3,
                              scheduler=DDIMConfig())
    dataset = ImageDataset(torch.zeros(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2]), ["a", "b", "c"])
    seen = []

    def spy(x_t, t, labels):
        seen.append(labels)
        return torch.zeros_like(x_t)

    monkeypatch.setattr(model.unet, "forward", spy)
    pixel_loss_fn(model, dataset, batch_size=4000, label_dropout=p)(0, torch.Generator().manual_seed(0))
    (labels,) = seen
    null = model.info.null_class_label
    assert null == 3 and set(labels.tolist()) <= {0, 1, 2, 3}
    share = (labels == null).float().mean().item()
    if p == 0:
        assert share == 0
    else:
        assert abs(share - p) < 0.03  # binomial sd at n = 4000 is 0.007


def test_bundled_chelsea_is_the_crops_of_the_photo(tmp_path):
    # The bundled subject is the same data as its crops written to a folder (PNG is lossless).
    from skimage import data

    from diffrt.data import CHELSEA_CROPS, load_source
    from diffrt.errors import DataError

    cat = data.chelsea()
    for i, (top, left, h, w) in enumerate(CHELSEA_CROPS):
        Image.fromarray(cat[top : top + h, left : left + w]).save(tmp_path / f"chelsea-{i}.png")
    bundled = load_source("chelsea", 24, labelled=False, crop="random")
    folder = load_image_folder(tmp_path, 24, crop="random")
    assert bundled.images.shape == (4, 3, 24, 24) and torch.equal(bundled.images, folder.images)
    assert torch.equal(draws(bundled, 3, seed=2), draws(folder, 3, seed=2))
    with pytest.raises(DataError, match="one subject, not classes"):
        load_source("chelsea", 24, labelled=True)


# --- images as they are shown: EXIF orientation and 16-bit greyscale ---------------------------------


def test_a_photo_stored_sideways_loads_upright(tmp_path):
    """Phones store pixels as the sensor read them plus an EXIF orientation; diffusers' load_image
    and its DreamBooth script transpose by it, and so does diffrt (else the subject trains rotated)."""
    from diffrt.images import load_image

    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = 255  # the left half white, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    image = load_image(tmp_path / "phone.jpg")
    assert image.shape == (3, 40, 20)  # displayed 20 wide and 40 high
    assert image[:, :20].mean() > 0.9 and image[:, 20:].mean() < 0.1  # the stored left half is now on top


def test_a_16_bit_greyscale_image_keeps_its_range(tmp_path):
    from diffrt.images import load_image

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")  # what Pillow opens 16-bit greyscale as
    image = load_image(tmp_path / "ramp16.png")
    assert image.shape == (3, 8, 64) and torch.equal(image[0], image[2])
    assert torch.allclose(image[0, 0], torch.linspace(0, 1, 64), atol=1e-4)  # not clipped at 255/65535
    resized = load_image(tmp_path / "ramp16.png", size=(4, 32))
    assert resized.shape == (3, 4, 32) and 0.45 < resized.mean() < 0.55


def test_a_float_image_outside_0_to_1_is_refused_by_name(tmp_path):
    """The bug (a review's): a 32-bit float TIFF holding 0-255 values was clipped to 1 and trained as a white image."""
    from diffrt.errors import DataError
    from diffrt.images import load_image

    ramp = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (4, 1))
    Image.fromarray(ramp, mode="F").save(tmp_path / "unit.tif")
    torch.testing.assert_close(load_image(tmp_path / "unit.tif")[0, 0], torch.from_numpy(ramp[0]))  # 0-1 reads as it is
    Image.fromarray(ramp * 255, mode="F").save(tmp_path / "bytes.tif")
    with pytest.raises(DataError, match=r"bytes.tif is a 32-bit float greyscale image with values from 0 to 255; "
                                        r"diffrt reads such pixels as 0 to 1: rescale it") as err:
        load_image(tmp_path / "bytes.tif")
    assert "\n" not in str(err.value)


def test_flip_and_crop_are_refused_for_the_bundled_digits():
    from diffrt.data import load_source
    from diffrt.errors import DataError

    for kwargs in ({"random_flip": True}, {"crop": "random"}):
        with pytest.raises(DataError, match="apply to image folders"):
            load_source("digits", 16, labelled=True, **kwargs)


def test_a_dangling_link_in_an_image_folder_is_named(wide_folder, tmp_path):
    """The bug: a link to a file that is gone was skipped without a word, shrinking the dataset."""
    from diffrt.errors import DataError

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "wide.png").write_bytes((wide_folder / "wide.png").read_bytes())
    (folder / "gone.png").symlink_to(tmp_path / "deleted.png")
    with pytest.raises(DataError, match=r"gone.png is a link to nothing \(it points to .*deleted.png\)"):
        load_image_folder(folder, 16)


def test_an_image_name_not_in_utf8_is_read_and_recorded(wide_folder, tmp_path):
    """The bug (a review's): the content hash --resume compares encoded each name as UTF-8, so a file or class folder
    named in Latin-1 (an old zip, a Windows share) ended every trainer in a UnicodeEncodeError traceback."""
    import os

    folder = tmp_path / "photos"
    folder.mkdir()
    name = os.fsdecode(b"d\xe9j\xe0.png")  # Latin-1 bytes: a surrogate in Python's str
    (folder / name).write_bytes((wide_folder / "wide.png").read_bytes())
    (folder / "plain.png").write_bytes((wide_folder / "wide.png").read_bytes())
    first = load_image_folder(folder, 16)
    assert len(first) == 2 and first.content == load_image_folder(folder, 16).content
    (folder / name).rename(folder / os.fsdecode(b"d\xe9j\xe1.png"))
    assert load_image_folder(folder, 16).content != first.content  # the name is in it


def test_a_huge_training_image_is_one_line_not_gigabytes(tmp_path):
    """A 17 KB 1-bit PNG of 12000 x 12000 pixels was decoded to 1.7 GB of float32, then copied (4 GB peak)."""
    from diffrt.errors import DataError

    folder = tmp_path / "big"
    folder.mkdir()
    Image.new("1", (13000, 13000)).save(folder / "huge.png")
    with pytest.raises(DataError, match=r"huge.png is 13000x13000 pixels; the limit is 160,000,000 pixels: downscale it"):
        load_image_folder(folder, 16)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_large_training_photos_are_reduced_while_decoding(tmp_path, suffix):
    """A folder of phone photos was decoded whole, every one, before any was resized (twenty 12 MP photos: 2.9 GB
    of float32; a 108 MP one was refused). Each is now decoded near its training size (a JPEG at 1/8 scale, then a
    whole-factor box reduction, to 4x the training size at least) and resized before the next: nearly the same
    training images."""
    import tracemalloc

    from diffrt.data import _prepare
    from diffrt.images import load_image

    rng = np.random.default_rng(0)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((6000, 4000), Image.BICUBIC))
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(smooth).save(folder / f"photo{suffix}", quality=95)
    reduced = load_image(folder / f"photo{suffix}", min_side=64)
    assert 256 <= min(reduced.shape[1:]) < 512 and reduced.shape[1:] == (min(reduced.shape[1:]), reduced.shape[2])

    tracemalloc.start()
    dataset = load_image_folder(folder, 64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 150e6  # the full decode alone is 72 MB of uint8 and 288 MB of float32
    full, _ = _prepare([("photo", load_image(folder / f"photo{suffix}"))], 64, "center")
    assert dataset.images.shape == full.shape == (1, 3, 64, 64)
    # JPEG's reduced-scale decode is nearly exact (0.005 here); a PNG's box pre-filter differs more on this sharp,
    # noisy picture (0.09 at worst, 0.016 on average, of the [-1, 1] range), well within what a resize choice changes.
    difference = (dataset.images - full).abs()
    assert difference.mean() < 0.025 and difference.max() < 0.15


def test_a_folder_named_like_a_bundled_set_wins_and_says_so(wide_folder, tmp_path, monkeypatch, caplog):
    """The bug: ./digits/ was ignored for the bundled digits without a word (a local path wins over a Hub id)."""
    import logging

    from diffrt.data import load_source

    (tmp_path / "digits").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "digits" / name).write_bytes((wide_folder / "wide.png").read_bytes())
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="diffrt.data"):
        assert len(load_source("digits", 16, labelled=False)) == 2
    assert "using the folder" in caplog.text and "not the bundled set" in caplog.text


def _png(path, size=(12, 8), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_images_in_sub_folders_are_found_and_macos_leftovers_skipped(tmp_path):
    """The bug: a photo under 2023/ (or a class's indoor/) was left out without a word; torchvision's ImageFolder
    and the Hub's imagefolder find it. A zip's __MACOSX folder is no data (it became a class of its own)."""
    from diffrt.data import list_images

    for name in ("a.png", "indoor/b.png", "outdoor/2023/c.png"):
        _png(tmp_path / "photos" / name)
    (tmp_path / "photos" / "__MACOSX").mkdir()
    (tmp_path / "photos" / "__MACOSX" / "._a.png").write_bytes(b"\0\5\26\7")
    (tmp_path / "photos" / "loop").symlink_to(tmp_path / "photos")  # a link back up is walked once
    assert [p.relative_to(tmp_path / "photos").as_posix() for p in list_images(tmp_path / "photos")] == [
        "a.png", "indoor/b.png", "outdoor/2023/c.png"]
    assert len(load_image_folder(tmp_path / "photos", 8)) == 3

    for name in ("cat/x.png", "cat/indoor/y.png", "dog/z.png"):
        _png(tmp_path / "classes" / name)
    (tmp_path / "classes" / "__MACOSX").mkdir()
    dataset = load_class_folders(tmp_path / "classes", 8)
    assert dataset.class_names == ["cat", "dog"] and dataset.labels.tolist() == [0, 0, 1]


def test_a_file_beside_class_folders_and_an_empty_class_are_one_line_with_the_fix(tmp_path):
    from diffrt.errors import DataError

    _png(tmp_path / "classes" / "cat" / "x.png")
    _png(tmp_path / "classes" / "stray.png")
    with pytest.raises(DataError, match=r"stray.png lies beside the class folders .* in no class; move it into its class's folder"):
        load_class_folders(tmp_path / "classes", 8)
    (tmp_path / "classes" / "stray.png").unlink()
    (tmp_path / "classes" / "README.md").write_text("a dataset card")  # a Hub download's: left out, as ImageFolder does
    assert load_class_folders(tmp_path / "classes", 8).class_names == ["cat"]
    (tmp_path / "classes" / "dog").mkdir()
    with pytest.raises(DataError, match=r"class folder .*dog has no images; add images of that class or remove the folder"):
        load_class_folders(tmp_path / "classes", 8)


def test_numbered_class_folders_take_their_numbers_order_and_a_model_keeps_its_own(tmp_path):
    """The bug: folders 0..11 were labelled in text order (label 2 was folder '10'), and fine-tuning a model whose
    classes were [cat, dog, bird] on those folders renumbered them alphabetically (each embedding retrained on
    another class, with a warning only)."""
    from diffrt.data import load_source

    for name in ("2", "10", "1"):
        _png(tmp_path / "numbers" / name / "x.png", seed=int(name))
    assert load_class_folders(tmp_path / "numbers", 8).class_names == ["1", "2", "10"]

    for i, name in enumerate(("cat", "dog", "bird")):
        _png(tmp_path / "pets" / name / "x.png", seed=10 + i)
    model_order = load_source(str(tmp_path / "pets"), 8, labelled=True, model_names=["cat", "dog", "bird"])
    by_name = load_class_folders(tmp_path / "pets", 8)
    assert model_order.class_names == ["cat", "dog", "bird"] and by_name.class_names == ["bird", "cat", "dog"]
    # The same image carries the model's label for its class.
    bird = by_name.images[by_name.labels == 0]
    assert torch.equal(model_order.images[model_order.labels == 2], bird)


def test_a_very_long_image_is_cut_to_its_central_part_before_it_is_resized(tmp_path, caplog):
    """The bug: a 1 x 4000 strip, resized to a short side of 128, became 128 x 512000 pixels (1.8 GB peak; 12 GB at
    512). Its central 4:1 part is resized instead: the same centre crop, and random crops from that part."""
    import logging
    import tracemalloc

    from diffrt.data import MAX_ASPECT, center_crop, resize_short_side

    strip = np.random.default_rng(0).integers(0, 256, (4000, 3, 3), dtype=np.uint8)  # 3 wide, 4000 tall
    (tmp_path / "strip").mkdir()
    Image.fromarray(strip).save(tmp_path / "strip" / "strip.png")
    tracemalloc.start()
    dataset = load_image_folder(tmp_path / "strip", 128)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert dataset.images.shape == (1, 3, 128, 128)
    assert peak < 50e6  # the whole strip resized is 128 x 170667 x 3 float32: 262 MB
    # The centre crop is that of the whole strip resized, but for the resampling's rounding.
    whole = center_crop(resize_short_side(torch.from_numpy(strip).permute(2, 0, 1).float() / 255, 128), 128) * 2 - 1
    assert (dataset.images[0] - whole).abs().mean() < 0.01
    with caplog.at_level(logging.WARNING, logger="diffrt.data"):
        drawn = load_image_folder(tmp_path / "strip", 128, crop="random")
    assert drawn.uncropped[0].shape == (3, 128 * MAX_ASPECT, 128)
    assert f"random crops are drawn from its central {MAX_ASPECT}:1 part" in caplog.text


def test_image_suffixes_are_those_pillow_opens_and_an_empty_file_says_so(tmp_path):
    """.jfif (a browser's JPEG download) and .ppm were refused as "not an image file"; a HEIC photo now names
    the plugin it needs, and a zero-byte file says it is empty, not "not a format Pillow knows"."""
    from diffrt.errors import DataError

    folder = tmp_path / "photos"
    _png(folder / "a.png")
    Image.open(folder / "a.png").save(folder / "b.jfif", format="JPEG")
    Image.open(folder / "a.png").save(folder / "c.ppm")
    assert len(load_image_folder(folder, 8)) == 3
    (folder / "d.HEIC").write_bytes(b"\0\0\0\30ftypheic")
    with pytest.raises(DataError, match=r"d.HEIC is HEIC, which Pillow opens only with the pillow-heif plugin; convert it"):
        load_image_folder(folder, 8)
    (folder / "d.HEIC").unlink()
    (folder / "e.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"e.png is empty \(0 bytes\)"):
        load_image_folder(folder, 8)


def test_class_images_past_the_count_asked_for_are_not_read(tmp_path):
    """The bug: dreambooth-lora decoded every image of --class-data, then kept the first --num-class-images (a
    pack of 1500 regularisation images at 512 px is ~11 GB; a damaged image it would not use stopped the run)."""
    for i in range(3):
        _png(tmp_path / "class" / f"c{i}.png", seed=i)
    (tmp_path / "class" / "zz-damaged.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    dataset = load_image_folder(tmp_path / "class", 8, limit=2)
    assert len(dataset) == 2
    assert torch.equal(dataset.images, load_image_folder(tmp_path / "class", 8, limit=3).images[:2])


def test_sixteen_bit_grey_photos_are_reduced_while_decoding_too(tmp_path):
    """A 16-bit greyscale image skipped the whole-factor reduction 8-bit images get (650 MB for 24 MP, not 160)."""
    from diffrt.images import load_image

    deep = np.random.default_rng(0).integers(0, 65536, (3840, 6000), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    reduced = load_image(tmp_path / "deep.png", min_side=64)
    # Shrunk by 3840 // (4 x 64) = 15, the mean of each 15 x 15 box, in float: no 8-bit step lost on the way.
    boxes = torch.from_numpy(deep.astype(np.float64).reshape(256, 15, 400, 15).mean(axis=(1, 3)) / 65535).float()
    assert reduced.shape == (3, 256, 400) and torch.equal(reduced[0], reduced[2])
    torch.testing.assert_close(reduced[0], boxes, rtol=0, atol=1e-5)


def test_an_out_inside_the_data_folder_is_refused_before_training(tmp_path, capsys):
    """Images are found in sub-folders now: a run whose --out lay inside --data had its loss.csv named as "not an
    image file" at the next run or --resume (and its sample grids would have been trained on)."""
    from diffrt.cli import main

    _png(tmp_path / "digits-folders" / "0" / "a.png")
    _png(tmp_path / "digits-folders" / "1" / "b.png")
    out = tmp_path / "digits-folders" / "runs"
    assert main(["train", "class-cond", "--data", str(tmp_path / "digits-folders"), "--out", str(out), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "is inside the --data folder" in err and "pass an --out outside it" in err
    assert not out.exists()


def test_an_image_file_too_large_to_read_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """From a security review: a sparse 2 GiB file named a.png (4 KB on disk) was read whole, 2.2 GiB of memory,
    before its decoding failed; a larger one would have had the process killed."""
    import diffrt.images as images
    from diffrt.data import load_image_folder
    from diffrt.errors import DataError

    monkeypatch.setattr(images, "MAX_IMAGE_FILE_BYTES", 1 << 20)  # the check, at a size a test can make
    with open(tmp_path / "a.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.truncate(3 << 20)  # sparse
    monkeypatch.setattr(type(tmp_path / "a.png"), "read_bytes", lambda self: pytest.fail(f"{self} was read"))
    with pytest.raises(DataError, match=r"a.png is 3 MiB; image files over 1 MiB are refused"):
        load_image_folder(tmp_path, 8)


def test_an_eps_file_is_never_handed_to_ghostscript(tmp_path, monkeypatch):
    """Pillow opens EPS by running Ghostscript on it, an interpreter with a history of code-execution bugs: a file in
    a data folder or a request's image is refused instead, whether or not Ghostscript is installed."""
    from PIL import EpsImagePlugin

    from diffrt.errors import DataError
    from diffrt.images import decode_image

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript ran"))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n"
    with pytest.raises(DataError, match="x.eps is not a readable image"):
        decode_image(eps, None, name="x.eps")


def test_a_format_pillow_knows_but_a_service_refuses_is_named_so():
    """From a review: a BMP sent to `diffrt serve` read "not a format Pillow knows", which Pillow does; the service
    takes PNG, JPEG and WebP only, which the line now says."""
    import io

    from diffrt.errors import DataError
    from diffrt.images import WEB_FORMATS, decode_image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="BMP")
    assert decode_image(buffer.getvalue(), None, name="x.bmp").shape == (3, 8, 8)  # a file: every format Pillow opens
    with pytest.raises(DataError, match=r"^x.bmp is not a readable image of the formats taken here \(PNG, JPEG, WEBP\); "
                                        r"convert it to PNG/JPEG/WEBP$"):
        decode_image(buffer.getvalue(), None, name="x.bmp", formats=WEB_FORMATS)


def test_the_digits_split_is_train_or_holdout_and_nothing_else():
    """From a review: any split but "holdout" gave the training split, so split="test" would have checked quality on
    the images the model trained on."""
    from diffrt.data import load_digits
    from diffrt.errors import DataError

    train, holdout = load_digits(split="train"), load_digits(split="holdout")
    assert len(train) + len(holdout) == 1797 and len(holdout) < len(train)
    for bad in ("test", "Holdout", "val"):
        with pytest.raises(DataError, match=rf"^split must be 'train' or 'holdout', got '{bad}'$"):
            load_digits(split=bad)


def test_pixels_a_rounding_past_the_ends_are_clipped_not_wrapped():
    from diffrt.images import to_uint8

    pixels = to_uint8(torch.tensor([-0.001, 0.0, 0.5, 1.0, 1.001]).reshape(1, 1, 1, 5))
    assert pixels.ravel().tolist() == [0, 0, 128, 255, 255]
