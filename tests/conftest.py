"""Shared fixtures: small real diffusers models built in code (no download)."""

from __future__ import annotations


import pytest
import torch

# The test models are tiny, so per-op overhead dominates: one intra-op thread is as fast as two,
# and on a 2-core machine shared with other work a second thread makes each call up to 10x slower.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _save_pixel(tmp_path_factory, name: str, conditioning: str):
    from diffrt.models import build_pixel_model, save_pixel_model, small_unet_config
    from diffrt.runtime.ddim import DDIMConfig

    torch.manual_seed(0)
    model = build_pixel_model(small_unet_config(16, 3, (16, 32)), conditioning=conditioning,
                              num_classes=0 if conditioning == "none" else 4, class_embedding_dim=3,
                              scheduler=DDIMConfig(clip_sample=True))
    return save_pixel_model(model, tmp_path_factory.mktemp(name) / "model")


@pytest.fixture(scope="session")
def uncond_model_dir(tmp_path_factory):
    """A randomly initialised unconditional UNet2DModel pipeline folder (16x16 RGB)."""
    return _save_pixel(tmp_path_factory, "uncond", "none")


@pytest.fixture(scope="session")
def classemb_model_dir(tmp_path_factory):
    """Class-conditioned through diffusers' num_class_embeds (4 classes + the null label)."""
    return _save_pixel(tmp_path_factory, "classemb", "class_embedding")


@pytest.fixture(scope="session")
def classchan_model_dir(tmp_path_factory):
    """Class-conditioned through label-embedding input channels."""
    return _save_pixel(tmp_path_factory, "classchan", "class_channels")


@pytest.fixture(scope="session")
def shipped_model_dir():
    from diffrt.models import SHIPPED_DIGITS

    if not (SHIPPED_DIGITS / "unet" / "config.json").is_file():
        pytest.fail(f"the shipped digits model is missing from {SHIPPED_DIGITS}")
    return SHIPPED_DIGITS


# --- text-to-image: one tiny Stable Diffusion folder and one exported artifact per session --------

# --- helpers the sampler tests share (imported: `from conftest import ...`) ----------------------


def generators(*seeds) -> list[torch.Generator]:
    """diffusers' list of generators, one per image."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def max_abs(a, b) -> float:
    return (torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max().item()


def one_line(info) -> str:
    """The text of a pytest.raises ExceptionInfo, asserted to be one line (user errors are)."""
    text = str(info.value)
    assert "\n" not in text
    return text


def diffusers_pipe(cls, folder, scheduler=None, **components):
    """diffusers' pipeline `cls` from a folder (the reference), optionally with another scheduler class
    made from the folder's config, as `pipe.scheduler = cls.from_config(pipe.scheduler.config)`."""
    pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False, **components)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


T2I_RANGES = dict(batch=(1, 2, 4), height=(32, 32, 64), width=(32, 32, 64))  # pixels; the tiny UNet needs >= 32
T2I_ARTIFACT_OPTIONS = dict(**T2I_RANGES, vae_encoder=True)  # t2i_artifact's export options


@pytest.fixture(scope="session")
def t2i_folder(tmp_path_factory):
    """A tiny random Stable Diffusion folder (32 px images) with a ControlNet in controlnet/."""
    from diffrt.tiny import tiny_text_to_image

    return tiny_text_to_image(tmp_path_factory.mktemp("t2i") / "sd", seed=0, controlnet=True)


@pytest.fixture(scope="session")
def t2i_artifact(t2i_folder, tmp_path_factory):
    """t2i_folder exported with its ControlNet and the VAE encoder: text_encoder, unet_controlnet, controlnet,
    vae_decoder, vae_encoder (fp32 ONNX)."""
    from diffrt.export.artifact import ExportOptions
    from diffrt.export.text_to_image import export_text_to_image

    out = tmp_path_factory.mktemp("t2i_artifact") / "artifact"
    export_text_to_image(t2i_folder, out, ExportOptions(**T2I_ARTIFACT_OPTIONS), [str(t2i_folder / "controlnet")])
    return out


@pytest.fixture(scope="session")
def t2i_controlnet_b(t2i_folder, tmp_path_factory):
    """A second ControlNet for t2i_folder's UNet: another seed, non-zero output convs."""
    from diffrt.tiny import tiny_controlnet

    return tiny_controlnet(t2i_folder, tmp_path_factory.mktemp("t2i_controlnet_b") / "controlnet", seed=11)


@pytest.fixture(scope="session")
def t2i_multi_artifact(t2i_folder, t2i_controlnet_b, tmp_path_factory):
    """t2i_folder exported with two ControlNets, controlnet/ then t2i_controlnet_b (MultiControlNetModel)."""
    from diffrt.export.artifact import ExportOptions
    from diffrt.export.text_to_image import export_text_to_image

    out = tmp_path_factory.mktemp("t2i_multi_artifact") / "artifact"
    export_text_to_image(t2i_folder, out, ExportOptions(**T2I_RANGES), [t2i_folder / "controlnet", t2i_controlnet_b])
    return out
