"""The trainers end to end on CPU with small real diffusers components (issue 3).

Every run is a few dozen steps of a tiny model: class-conditioned UNets on 8x8 digits, a
pixel UNet fine-tuned on crops of scikit-image's `chelsea` photo, and DreamBooth-LoRA on the
tiny Stable Diffusion folder of `diffrt.tiny` with the same cat as its subject. diffusers is
the oracle wherever it can be: its scheduler for the v-prediction target, its own
StableDiffusionPipeline for loading the trained LoRA.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffrt.cli import main
from diffrt.errors import DiffrtError
from diffrt.models import build_pixel_model, load_pixel_model, save_pixel_model, small_unet_config
from diffrt.runtime.ddim import DDIMConfig, make_alphas_cumprod
from diffrt.train.classcond import ClassCondConfig, train_class_conditioned
from diffrt.train.dreambooth import LORA_WEIGHT_NAME, DreamBoothConfig, train_dreambooth_lora
from diffrt.train.finetune import FinetuneConfig, finetune
from diffrt.train.checkpoints import list_checkpoints, verify_checkpoint
from diffrt.train.config import TrainConfig

STEPS = 30  # pixel-model runs: long enough for the loss to fall clearly, short enough for CI
K = 5  # losses averaged at each end of a run


def train_config(out: Path, **overrides) -> TrainConfig:
    """A constant learning rate, so that a run stopped at N/2 and resumed follows the same
    schedule as an uninterrupted one (a cosine schedule depends on max_steps)."""
    base = dict(out=str(out), max_steps=STEPS, batch_size=16, learning_rate=2e-3, lr_warmup_steps=0,
                lr_schedule="constant", checkpoint_every=STEPS // 2, log_every=1, seed=0)
    return TrainConfig(**{**base, **overrides})


def read_loss_csv(out: Path) -> list[tuple[int, float]]:
    with open(out / "loss.csv", newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def assert_loss_goes_down(losses: list[float], factor: float = 0.85) -> None:
    first, last = np.mean(losses[:K]), np.mean(losses[-K:])
    assert last < factor * first, f"loss did not go down: first {K} mean {first:.4f}, last {K} mean {last:.4f}"


def assert_run_outputs(out: Path, steps: int, every: int) -> None:
    assert [s for s, _ in read_loss_csv(out)] == list(range(1, steps + 1))
    ckpts = list_checkpoints(out / "checkpoints")
    assert [p.name for p in ckpts] == [f"step-{s:07d}" for s in range(every, steps + 1, every)]
    assert all(verify_checkpoint(p) is not None for p in ckpts)
    assert (out / "samples" / f"step-{steps:07d}.png").is_file()
    assert any((out / "tensorboard").iterdir())


# -- data -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cat_folder(tmp_path_factory) -> Path:
    """Four crops of different sizes and aspect ratios (PNG and JPEG) of scikit-image's cat."""
    from PIL import Image
    from skimage import data

    from diffrt.data import CHELSEA_CROPS

    cat = data.chelsea()  # 300 x 451 RGB
    folder = tmp_path_factory.mktemp("cat")
    for i, (top, left, h, w) in enumerate(CHELSEA_CROPS):
        Image.fromarray(cat[top : top + h, left : left + w]).save(folder / f"chelsea-{i}.{'jpg' if i == 3 else 'png'}")
    return folder


# -- class-conditioned ----------------------------------------------------------------------------


def class_cond_config(out: Path, conditioning: str, **train) -> ClassCondConfig:
    return ClassCondConfig(data="digits", conditioning=conditioning, sample_size=8, widths=(16, 32), sample_steps=2,
                           train=train_config(out, ema_decay=0.9, **train))


@pytest.fixture(scope="module")
def class_cond_runs(tmp_path_factory) -> dict:
    runs = {}
    for conditioning in ("class_embedding", "class_channels"):
        out = tmp_path_factory.mktemp(conditioning)
        runs[conditioning] = (out, train_class_conditioned(class_cond_config(out, conditioning)))
    return runs


@pytest.mark.parametrize("conditioning", ["class_embedding", "class_channels"])
def test_class_cond_writes_outputs_and_learns(class_cond_runs, conditioning):
    out, result = class_cond_runs[conditioning]
    assert_run_outputs(out, STEPS, STEPS // 2)
    model = load_pixel_model(out / "model")
    assert model.info.conditioning == conditioning and model.info.num_classes == 10
    assert model.info.training["seed"] == 0 and model.info.training["steps"] == STEPS
    assert_loss_goes_down(result.losses, factor=0.8)


@pytest.mark.parametrize("conditioning", ["class_embedding", "class_channels"])
def test_class_cond_resume_is_exact(class_cond_runs, conditioning, tmp_path):
    full_out, full = class_cond_runs[conditioning]
    cfg = class_cond_config(tmp_path, conditioning, max_steps=STEPS // 2)
    train_class_conditioned(cfg)
    resumed = train_class_conditioned(replace(cfg, train=replace(cfg.train, max_steps=STEPS, resume=True)))
    assert resumed.start_step == STEPS // 2
    np.testing.assert_allclose(resumed.losses, full.losses[STEPS // 2 :], rtol=1e-6, atol=0)
    # The EMA weights that end up in the model folder match too.
    a = load_file(full_out / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in a)


@pytest.mark.parametrize("damage", ["state.json missing", "weights.safetensors", "optimizer.safetensors", "ema.safetensors"])
def test_resume_skips_a_damaged_checkpoint(class_cond_runs, damage, tmp_path):
    """A checkpoint whose state.json is missing, or any of whose files a resume reads has a flipped byte (the model's
    weights, Adam's moments, the EMA weights), is passed over for the one before it."""
    full_out, full = class_cond_runs["class_embedding"]
    out = tmp_path / "run"
    shutil.copytree(full_out, out)
    last = out / "checkpoints" / f"step-{STEPS:07d}"
    if damage == "state.json missing":
        (last / "state.json").unlink()  # as if the run died before writing it
    else:
        damaged = last / damage
        data = bytearray(damaged.read_bytes())
        data[-1] ^= 0xFF
        damaged.write_bytes(bytes(data))
        assert verify_checkpoint(last) is None
    (out / "checkpoints" / ".step-half-written").mkdir()  # an interrupted save: never a candidate
    resumed = train_class_conditioned(class_cond_config(out, "class_embedding", resume=True))
    # It went back to the good checkpoint at STEPS/2 and retrained the second half identically.
    np.testing.assert_allclose(resumed.losses, full.losses[STEPS // 2 :], rtol=1e-6, atol=0)
    assert verify_checkpoint(last) is not None  # rewritten whole
    assert not list((out / "checkpoints").glob(".step-*"))  # the interrupted save was removed


def test_resume_without_a_good_checkpoint_fails_clearly(class_cond_runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(class_cond_runs["class_embedding"][0], out)
    for ckpt in list_checkpoints(out / "checkpoints"):
        (ckpt / "state.json").unlink()
    with pytest.raises(DiffrtError, match="no complete checkpoint"):
        train_class_conditioned(class_cond_config(out, "class_embedding", resume=True))


# -- fine-tuning --------------------------------------------------------------------------------


def save_pretrained_pixel_model(folder: Path, scheduler: DDIMConfig | None = None, channels: int = 3, **kw) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_pixel_model(small_unet_config(8, channels, (16, 32)), scheduler=scheduler or DDIMConfig(), **kw)
    return save_pixel_model(model, folder)


def test_finetune_writes_outputs_learns_and_exports(cat_folder, tmp_path):
    from diffusers import UNet2DModel

    from diffrt.export.artifact import export_model
    from diffrt.export.options import ExportOptions

    base = save_pretrained_pixel_model(tmp_path / "base")
    out = tmp_path / "out"
    result = finetune(FinetuneConfig(model=str(base), data=str(cat_folder), crop="random", random_flip=True,
                                     sample_steps=2, train=train_config(out, batch_size=8)))
    assert_run_outputs(out, STEPS, STEPS // 2)
    assert_loss_goes_down(result.losses)
    # diffusers reads the output as is, and it holds the trained (not the base) weights.
    unet = UNet2DModel.from_pretrained(out / "model", subfolder="unet")
    before = UNet2DModel.from_pretrained(base, subfolder="unet")
    assert not torch.equal(unet.conv_in.weight, before.conv_in.weight)
    assert load_pixel_model(out / "model").info.training["trainer"] == "finetune"
    # ... and so does `diffrt export`, whose parity check runs the exported UNet against it.
    export = export_model(out / "model", tmp_path / "artifact", ExportOptions(batch=(1, 2, 4)))
    assert export.manifest["components"]["unet"]["parity"]["onnxruntime"]["cosine"] > 0.9999


def test_finetune_resume_is_exact(cat_folder, tmp_path):
    """Fine-tuning with random crops and flips, stopped half-way and resumed: the same losses and weights as one run
    (the crops and flips of each step come from that step's generator, not from a stream the stop would cut)."""
    base = save_pretrained_pixel_model(tmp_path / "base")

    def config(out: Path, **train) -> FinetuneConfig:
        return FinetuneConfig(model=str(base), data=str(cat_folder), crop="random", random_flip=True, sample_steps=2,
                              train=train_config(out, batch_size=4, **train))

    full = finetune(config(tmp_path / "full"))
    finetune(config(tmp_path / "run", max_steps=STEPS // 2))
    resumed = finetune(config(tmp_path / "run", resume=True))
    assert resumed.start_step == STEPS // 2
    np.testing.assert_allclose(resumed.losses, full.losses[STEPS // 2 :], rtol=1e-6, atol=0)
    a = load_file(tmp_path / "full" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "run" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in a)


def test_finetune_bare_unet_folder_in_grey(cat_folder, tmp_path, caplog):
    """A bare UNet folder trains with diffusers' default schedule, and says so: the objective is the scheduler's."""
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        UNet2DModel(**small_unet_config(8, 1, (16, 32))).save_pretrained(tmp_path / "bare")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        finetune(FinetuneConfig(model=str(tmp_path / "bare"), data=str(cat_folder), num_samples=4, sample_steps=2,
                                train=train_config(out, max_steps=2, batch_size=4, checkpoint_every=2)))
    assert "has no scheduler config" in caplog.text and "1000 steps of linear betas predicting epsilon" in caplog.text
    assert UNet2DModel.from_pretrained(out / "model", subfolder="unet").config.in_channels == 1


def test_finetune_class_conditioned_model_on_digits(tmp_path):
    base = save_pretrained_pixel_model(tmp_path / "base", conditioning="class_embedding", num_classes=10)
    out = tmp_path / "out"
    finetune(FinetuneConfig(model=str(base), data="digits", sample_steps=2,
                            train=train_config(out, max_steps=2, batch_size=4, checkpoint_every=2)))
    assert load_pixel_model(out / "model").info.num_classes == 10
    wrong = save_pretrained_pixel_model(tmp_path / "three", conditioning="class_embedding", num_classes=3)
    with pytest.raises(DiffrtError, match="3 classes but digits has 10"):
        finetune(FinetuneConfig(model=str(wrong), data="digits", train=train_config(tmp_path / "x")))


def first_finetune_step(base: Path, cat_folder: Path, out: Path, bs: int = 4):
    """Fine-tune `base` one step; return its logged loss and, redrawn in the trainer's order (batch
    indices, then timesteps, then noise), that step's draws with the base UNet's prediction on
    them and diffusers' DDPMScheduler of the base."""
    from diffusers import DDPMScheduler

    from diffrt.data import load_image_folder
    from diffrt.train.loop import step_generator

    result = finetune(FinetuneConfig(model=str(base), data=str(cat_folder), num_samples=1, sample_steps=1,
                                     train=train_config(out, max_steps=1, batch_size=bs, checkpoint_every=1)))
    g = step_generator(0, 0)
    x0 = load_image_folder(cat_folder, 8).images[torch.randint(0, 4, (bs,), generator=g)]
    t = torch.randint(0, 1000, (bs,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    oracle = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the trainer ran: the same conv kernels (TF32 on a GPU)
    unet = load_pixel_model(base).unet.to(device)
    with torch.no_grad():
        pred = unet(oracle.add_noise(x0, noise, t).to(device), t.to(device)).cpu()
    return result.losses[0], x0, t, noise, pred, oracle


def test_finetune_uses_the_models_prediction_type(cat_folder, tmp_path):
    """The first logged loss equals the MSE to diffusers' own v target (DDPMScheduler.get_velocity)
    on the same draws, for a model whose scheduler says v_prediction with a cosine schedule."""
    scheduler = DDIMConfig(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2")
    base = save_pretrained_pixel_model(tmp_path / "base", scheduler=scheduler)
    loss, x0, t, noise, pred, oracle = first_finetune_step(base, cat_folder, tmp_path / "out")
    assert oracle.config.prediction_type == "v_prediction"
    expected = torch.nn.functional.mse_loss(pred, oracle.get_velocity(x0, noise, t)).item()
    assert loss == pytest.approx(expected, rel=1e-4)
    assert json.loads((tmp_path / "out" / "model" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"


def test_class_cond_trains_the_prediction_type_and_schedule_asked_for(tmp_path):
    """--prediction-type and --beta-schedule (diffusers' train_unconditional.py offers both) reach the loss and the
    saved scheduler config, which is what every sampler of the model reads."""
    from diffusers import DDPMScheduler

    out = tmp_path / "run"
    assert main(["train", "class-cond", "--resolution", "8", "--widths", "16", "32", "--max-steps", "2", "--batch-size", "2",
                 "--lr-warmup-steps", "0", "--prediction-type", "v_prediction", "--beta-schedule", "squaredcos_cap_v2",
                 "--out", str(out)]) == 0
    model = load_pixel_model(out / "model")
    assert (model.scheduler.prediction_type, model.scheduler.beta_schedule) == ("v_prediction", "squaredcos_cap_v2")
    reference = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(make_alphas_cumprod(model.scheduler), reference.alphas_cumprod.float())
    assert main(["generate", "--model", str(out / "model"), "--class-label", "3", "--steps", "2", "--num-images", "1",
                 "--out", str(tmp_path / "x.png")]) == 0


def test_finetune_weighs_a_sample_prediction_by_snr(cat_folder, tmp_path):
    """For an x0 ("sample") model the first logged loss is diffusers' train_unconditional.py loss on
    the same draws: the MSE to the clean images, each pixel weighted by alpha_bar / (1 - alpha_bar)
    of its sample's timestep, then averaged."""
    base = save_pretrained_pixel_model(tmp_path / "base", scheduler=DDIMConfig(prediction_type="sample"))
    loss, x0, t, _, pred, oracle = first_finetune_step(base, cat_folder, tmp_path / "out")
    alpha_t = oracle.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = (alpha_t / (1 - alpha_t) * torch.nn.functional.mse_loss(pred, x0, reduction="none")).mean().item()
    assert loss == pytest.approx(expected, rel=1e-4)


def test_published_outputs_are_readable_as_the_umask_allows(cat_folder, tmp_path):
    """The model folder and checkpoints are staged in temporary folders and renamed into place; made
    by tempfile.mkdtemp they were 0700, private to the trainer, so a service or exporter running as
    another user could not read them."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        base = save_pretrained_pixel_model(tmp_path / "base")
        first_finetune_step(base, cat_folder, tmp_path / "out")
    finally:
        os.umask(old)
    for folder in (base, tmp_path / "out" / "model", *list_checkpoints(tmp_path / "out" / "checkpoints")):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
        # And their files, the weights too: safetensors >= 0.7 writes a 0600 file of its own and renames it in place.
        files = [path for path in folder.rglob("*") if path.is_file()]
        assert any(path.suffix == ".safetensors" for path in files), folder
        assert {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in files} == {path.name: "0o644" for path in files}


def test_finetune_keeps_the_base_scheduler_config_and_pipeline(cat_folder, tmp_path):
    """The output's scheduler config is the base's as it was: a DDPMScheduler stays one, with its
    variance_type (which diffrt does not read). A DDPMPipeline stays one too, as diffusers'
    train_unconditional.py saves it: the result named DDIMPipeline, which DiffusionPipeline loaded
    with the scheduler turned into DDIM's (a default call: 50 DDIM steps instead of 1000 DDPM ones)."""
    from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline

    base = save_pretrained_pixel_model(tmp_path / "base")
    DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                  clip_sample=False, variance_type="fixed_large").save_pretrained(base / "scheduler")
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(json.dumps({**index, "_class_name": "DDPMPipeline",
                                                       "scheduler": ["diffusers", "DDPMScheduler"]}))
    out = tmp_path / "out"
    finetune(FinetuneConfig(model=str(base), data=str(cat_folder), num_samples=1, sample_steps=1,
                            train=train_config(out, max_steps=1, batch_size=2, checkpoint_every=1)))
    saved = json.loads((out / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert saved == json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(out / "model")
    assert isinstance(pipe, DDPMPipeline) and isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.scheduler.config.variance_type == "fixed_large"
    assert load_pixel_model(out / "model").scheduler == load_pixel_model(base).scheduler


def test_finetune_refuses_a_unet_that_is_not_square(cat_folder, tmp_path):
    """sample_size (8, 16) was trained on 8x8 crops without a word; diffusers samples that model at 8x16."""
    from diffusers import UNet2DModel

    UNet2DModel(**{**small_unet_config(8, 3, (16, 32)), "sample_size": (8, 16)}).save_pretrained(tmp_path / "wide")
    with pytest.raises(DiffrtError, match=r"sample_size is \(8, 16\), not square; .* set sample_size in its unet/config.json"):
        finetune(FinetuneConfig(model=str(tmp_path / "wide"), data=str(cat_folder), train=train_config(tmp_path / "out", max_steps=1)))
    assert not (tmp_path / "out").exists()


def test_label_dropout_0_draws_grids_without_guidance_and_generate_warns(tmp_path, monkeypatch, caplog):
    """With --label-dropout 0 no step trains the null class, yet the grids (and a later `generate`) guided by it
    at scale 3 without a word."""
    from diffrt.generate import GenerateRequest, generate
    from diffrt.runtime import pipeline as pipeline_module

    scales = []
    call = pipeline_module.PixelPipeline.__call__

    def recording(self, *args, **kwargs):
        scales.append(kwargs.get("guidance_scale"))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(pipeline_module.PixelPipeline, "__call__", recording)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        train_class_conditioned(ClassCondConfig(data="digits", sample_size=8, widths=(16,), sample_steps=1, label_dropout=0.0,
                                                train=train_config(out, max_steps=1, batch_size=4, checkpoint_every=1)))
    assert "--label-dropout 0 trains no step on the null class" in caplog.text
    assert scales == [1.0]  # the one grid, after the last step
    assert load_pixel_model(out / "model").info.training["label_dropout"] == 0.0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        generate(GenerateRequest(model=str(out / "model"), backend="torch", class_label=1, num_inference_steps=1,
                                 out=str(tmp_path / "g.png")))
    assert "last training ran with --label-dropout 0" in caplog.text and scales[-1] == 2.0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        generate(GenerateRequest(model=str(out / "model"), backend="torch", class_label=1, num_inference_steps=1,
                                 guidance_scale=1.0, out=str(tmp_path / "g1.png")))
    assert "label-dropout" not in caplog.text


def test_finetune_names_the_classes_of_its_data(cat_folder, tmp_path):
    """A class-conditioned model fine-tuned on class folders is saved with those folders' names:
    label i is now folder i."""
    base = save_pretrained_pixel_model(tmp_path / "base", conditioning="class_embedding", num_classes=2)
    assert load_pixel_model(base).info.class_names == []
    for name in ("cat", "kitten"):
        shutil.copytree(cat_folder, tmp_path / "data" / name)
    out = tmp_path / "out"
    finetune(FinetuneConfig(model=str(base), data=str(tmp_path / "data"), sample_steps=1,
                            train=train_config(out, max_steps=1, batch_size=2, checkpoint_every=1)))
    assert load_pixel_model(out / "model").info.class_names == ["cat", "kitten"]


def test_finetune_refuses_a_latent_pipeline(cat_folder, tmp_path):
    """An LDMPipeline's UNet2DModel denoises VQ-VAE latents: it is refused, not trained on pixels."""
    base = save_pretrained_pixel_model(tmp_path / "ldm")
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(json.dumps({**index, "_class_name": "LDMPipeline", "vqvae": ["diffusers", "VQModel"]}))
    with pytest.raises(DiffrtError, match="latent pipeline"):
        finetune(FinetuneConfig(model=str(base), data=str(cat_folder), train=train_config(tmp_path / "runs" / "out", max_steps=1)))
    assert not (tmp_path / "runs").exists()  # nor the folders made for the run's lock


# -- DreamBooth-LoRA ----------------------------------------------------------------------------

DB_STEPS = 4


@pytest.fixture(scope="module")
def sd_folder(t2i_folder) -> Path:
    """conftest's tiny Stable Diffusion folder (diffrt.tiny, 32 px images, 4x4 latents)."""
    return t2i_folder


def dreambooth_config(sd_folder: Path, cat_folder: Path, out: Path, class_data: Path, **train) -> DreamBoothConfig:
    return DreamBoothConfig(
        model=str(sd_folder), instance_data=str(cat_folder), instance_prompt="a photo of sks cat",
        class_prompt="a photo of a cat", with_prior_preservation=True, class_data=str(class_data), num_class_images=2,
        prior_loss_weight=0.5, rank=4, lora_alpha=8, train_text_encoder=True, resolution=32, random_flip=True,
        num_validation_images=2, inference_steps=2, class_inference_steps=2,
        train=train_config(out, **{**dict(max_steps=DB_STEPS, batch_size=2, learning_rate=1e-2, checkpoint_every=DB_STEPS // 2,
                                          sample_every=DB_STEPS // 2), **train}),
    )


@pytest.fixture(scope="module")
def dreambooth_run(sd_folder, cat_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("dreambooth")
    cfg = dreambooth_config(sd_folder, cat_folder, root / "out", root / "class_images")
    return cfg, train_dreambooth_lora(cfg)


def test_dreambooth_writes_outputs(dreambooth_run):
    cfg, result = dreambooth_run
    out = Path(cfg.train.out)
    assert_run_outputs(out, DB_STEPS, DB_STEPS // 2)
    assert (out / "samples" / f"step-{DB_STEPS // 2:07d}.png").is_file()  # validation every N steps
    assert (out / LORA_WEIGHT_NAME).is_file() and not list(out.glob(".lora-*"))
    assert len(list(Path(cfg.class_data).glob("*.png"))) == 2  # generated by the base model
    # Checkpoints hold the trainable LoRA parameters of both models and nothing of the frozen base.
    keys = load_file(out / "checkpoints" / f"step-{DB_STEPS:07d}" / "weights.safetensors").keys()
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder"}
    assert json.loads((out / "dreambooth.json").read_text())["rank"] == 4


def test_dreambooth_resume_is_exact(dreambooth_run, sd_folder, cat_folder, tmp_path):
    full_cfg, full = dreambooth_run
    cfg = dreambooth_config(sd_folder, cat_folder, tmp_path / "out", Path(full_cfg.class_data), max_steps=DB_STEPS // 2)
    train_dreambooth_lora(cfg)
    resumed = train_dreambooth_lora(replace(cfg, train=replace(cfg.train, max_steps=DB_STEPS, resume=True)))
    np.testing.assert_allclose(resumed.losses, full.losses[DB_STEPS // 2 :], rtol=1e-6, atol=0)
    # ... and the LoRA it saves is the uninterrupted run's.
    a, b = load_file(Path(full_cfg.train.out) / LORA_WEIGHT_NAME), load_file(tmp_path / "out" / LORA_WEIGHT_NAME)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in a)


def test_dreambooth_warns_once_per_prompt_past_the_text_encoders_length(dreambooth_run, sd_folder, cat_folder, tmp_path,
                                                                          caplog):
    """Training cuts prompts at the text encoder's 77 tokens, as diffusers does; it said nothing. Each
    trained prompt that is cut is named once, with the count and text dropped (the text `diffrt
    generate` reports for it), before class images are generated."""
    long_prompt = "a photo of sks cat " + " ".join(f"word{i}" for i in range(60))
    cfg = replace(dreambooth_config(sd_folder, cat_folder, tmp_path / "out", tmp_path / "class_images", max_steps=1),
                  instance_prompt=long_prompt, class_prompt="a photo of a cat " + " ".join(f"tail{i}" for i in range(60)),
                  validation_prompt="a photo of sks cat", train_text_encoder=False)
    with caplog.at_level("INFO", logger="diffrt.train.dreambooth"):
        train_dreambooth_lora(cfg)
    messages = [r.getMessage() for r in caplog.records if r.name == "diffrt.train.dreambooth"]
    cut = [m for m in messages if "longer than the text encoder's 77 tokens" in m]
    assert [m.split(" ", 1)[0] for m in cut] == ["--instance-prompt", "--class-prompt"]
    full = len(tokenize_untruncated(sd_folder, long_prompt))
    assert f"training drops its last {full - 77}: " in cut[0]
    assert cut[0].replace(" ", "").endswith("word59'") and cut[1].replace(" ", "").endswith("tail59'")
    assert messages.index(cut[1]) < next(i for i, m in enumerate(messages) if "generating 2 class images" in m)
    caplog.clear()
    with caplog.at_level("WARNING", logger="diffrt.train.dreambooth"):  # prompts that fit: no word
        train_dreambooth_lora(replace(cfg, instance_prompt="a photo of sks cat", class_prompt="a photo of a cat",
                                      train=replace(cfg.train, out=str(tmp_path / "short"))))
    assert not [r for r in caplog.records if "text encoder" in r.getMessage()]


def test_class_images_are_what_diffusers_pipeline_of_the_folder_makes(sd_folder, cat_folder, tmp_path, monkeypatch):
    """A review against diffusers' train_dreambooth_lora.py: it makes class images with `pipeline(class_prompt)`, the
    folder's own scheduler at its default 50 steps and the model's own size (its dataset then resizes them); diffrt
    made them with DDIM at --inference-steps and at --resolution, smaller images than the base model draws well. Now
    a class image is diffusers' own: here a folder whose model_index.json names Euler (its scheduler config DDIM's
    keys) and whose native size (64 px) is above the trained 32 px."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from PIL import Image

    folder = tmp_path / "sd"
    shutil.copytree(sd_folder, folder)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**unet_config, "sample_size": 8}))  # 8 latents x 8 = 64 px
    # model_index.json names the class from_pretrained builds (over the DDIM config here, as a hand-edited folder has it).
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "EulerDiscreteScheduler"]}))
    cfg = DreamBoothConfig(model=str(folder), instance_data=str(cat_folder), instance_prompt="a photo of sks cat",
                           class_prompt="a photo of a cat", with_prior_preservation=True, num_class_images=1,
                           class_inference_steps=3, resolution=32, rank=2, num_validation_images=1, inference_steps=1,
                           train=train_config(tmp_path / "out", max_steps=1, batch_size=1))
    # A random tiny UNet barely moves the latents, so the image alone hardly tells samplers apart: count the real
    # scheduler's steps as well (a spy: the step itself runs unchanged).
    steps = []
    real_step = EulerDiscreteScheduler.step
    monkeypatch.setattr(EulerDiscreteScheduler, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    train_dreambooth_lora(cfg)
    monkeypatch.undo()
    assert len(steps) == 3  # one image, --class-inference-steps 3, with the class model_index.json names
    made = np.asarray(Image.open(tmp_path / "out" / "class_images" / "class-00000.png").convert("RGB")).astype(int)
    assert made.shape == (64, 64, 3)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a photo of a cat", num_inference_steps=3, guidance_scale=cfg.guidance_scale, output_type="np",
               generator=[torch.Generator().manual_seed(cfg.train.seed * 100_003)]).images[0]
    assert np.abs(made - np.round(ref * 255).astype(int)).max() <= 1


def test_a_target_list_with_names_the_model_lacks_trains_the_ones_it_has(sd_folder, caplog):
    """diffusers' script targets to_k, to_q, to_v, to_out.0, add_k_proj, add_v_proj on every UNet, and peft skips what a
    model lacks (SD-1.5 has no add_k_proj): diffrt refused the list. It now names the missing ones in a warning; a
    list none of whose names match is still refused (test_bad_input_raises_diffrt_error_from_the_library)."""
    import logging

    from diffusers import UNet2DConditionModel

    from diffrt.train.lora_adapters import check_targets

    unet = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    with caplog.at_level(logging.WARNING, logger="diffrt.train.lora_adapters"):
        check_targets(unet, ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"), "UNet", "--target-modules")
    assert ("--target-modules: add_k_proj, add_v_proj match no module of the UNet and are left out; LoRA goes on "
            "to_k, to_q, to_v, to_out.0") in caplog.text


def tokenize_untruncated(sd_folder: Path, prompt: str) -> list[int]:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(sd_folder / "tokenizer")(prompt, verbose=False).input_ids


@pytest.mark.parametrize("case", ["other settings", "no checkpoint"])
def test_dreambooth_resume_is_refused_before_class_images_are_generated(dreambooth_run, sd_folder, cat_folder, tmp_path,
                                                                         case):
    """The loop refuses a --resume with changed settings or without a checkpoint, but DreamBooth
    fills its class-image folder before the loop starts: the refusal has to come first, not after
    generating images (minutes to hours on a real model) with the refused settings into the run's folder."""
    full_cfg, _ = dreambooth_run
    class_data = tmp_path / "class_images"
    shutil.copytree(full_cfg.class_data, class_data)  # the 2 images of the fixture's run
    if case == "other settings":
        shutil.copytree(Path(full_cfg.train.out) / "checkpoints", tmp_path / "out" / "checkpoints")
    cfg = replace(dreambooth_config(sd_folder, cat_folder, tmp_path / "out", class_data, resume=True), num_class_images=3)
    before = sorted(p.name for p in class_data.iterdir())
    match = "num_class_images: 2 saved vs 3 now" if case == "other settings" else "no complete checkpoint"
    with pytest.raises(DiffrtError, match=match):
        train_dreambooth_lora(cfg)
    assert sorted(p.name for p in class_data.iterdir()) == before


def test_dreambooth_resume_refuses_other_class_images(dreambooth_run, sd_folder, cat_folder, tmp_path):
    """The bug (a review's): the checkpoint recorded the instance images but not the class images, so a --resume whose
    class folder had an image replaced or added (one sorting first changes the first --num-class-images) trained on
    other priors without a word."""
    full_cfg, _ = dreambooth_run
    class_data = shutil.copytree(full_cfg.class_data, tmp_path / "class_images")  # the fixture's 2: none generated
    cfg = dreambooth_config(sd_folder, cat_folder, tmp_path / "out", class_data, max_steps=1, checkpoint_every=1)
    train_dreambooth_lora(cfg)
    resume = replace(cfg, train=replace(cfg.train, max_steps=2, resume=True))
    first = sorted(class_data.glob("*.png"))[0]
    shutil.copy(first, class_data / "a-first.png")  # sorts first: the first two are now another pair
    with pytest.raises(DiffrtError, match=r"class_content: '[0-9a-f]{16}' saved vs '[0-9a-f]{16}' now"):
        train_dreambooth_lora(resume)
    (class_data / "a-first.png").unlink()
    assert len(train_dreambooth_lora(resume).losses) == 1  # the same images: resumed


def test_dreambooth_reads_the_class_images_there_before_generating_more(bad_inputs, sd_folder, cat_folder, tmp_path, capsys):
    """The bug (a review's): a file in --class-data that is no image failed the run only after the missing class
    images were generated with the base model (minutes to hours on a real one)."""
    class_data = tmp_path / "class"
    shutil.copytree(bad_inputs / "not_image", class_data)  # good.png and notes.png, which is text
    argv = ["train", "dreambooth-lora", "--model", str(sd_folder), "--instance-data", str(cat_folder), "--instance-prompt",
            "a photo of sks cat", "--resolution", "32", "--max-steps", "1", "--with-prior-preservation", "--class-prompt",
            "a cat", "--class-data", str(class_data), "--num-class-images", "3", "--inference-steps", "1",
            "--class-inference-steps", "1", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffrt: error:")]
    assert len(errors) == 1 and "notes.png is not a readable image" in errors[0]
    assert sorted(p.name for p in class_data.iterdir()) == ["good.png", "notes.png"]  # none generated


def test_dreambooth_random_crops_are_encoded_per_draw(sd_folder, cat_folder, monkeypatch):
    """With --crop random the VAE posteriors cannot be cached: each draw encodes its own crops,
    drawn from the step's generator, so a resumed step sees the same latents."""
    from diffrt.data import load_image_folder
    from diffrt.train.dreambooth import LatentCache, load_components

    c = load_components(sd_folder, torch.device("cpu"), torch.float32)
    dataset = load_image_folder(cat_folder, 32, crop="random")
    cache = LatentCache(c, dataset, random_flip=False)
    assert cache.mean is None
    encoded, encode = [], cache._encode
    monkeypatch.setattr(cache, "_encode", lambda x: encoded.append(x) or encode(x))
    idx = torch.ones(8, dtype=torch.long)  # chelsea-1, 200 x 260: resized to 32 x 42, 11 crop offsets
    z = cache.sample(idx, torch.Generator().manual_seed(0))
    assert z.shape == (8, 4, 4, 4)
    torch.testing.assert_close(cache.sample(idx, torch.Generator().manual_seed(0)), z, rtol=0, atol=0)
    full = dataset.uncropped[1]
    crops = encoded[0]
    assert all(any(torch.equal(x, full[:, :, left : left + 32]) for left in range(full.shape[-1] - 31)) for x in crops)
    assert len({tuple(x.flatten().tolist()) for x in crops}) > 1  # several crops of the one image


def test_dreambooth_latents_are_scaled_as_the_runtime_decodes_them(sd_folder):
    """The bug: training subtracted a VAE config's shift_factor that StableDiffusionPipeline and diffrt's runtime
    never add back before decoding, so a LoRA trained on such a VAE learnt latents the sampler decodes shifted."""
    from diffusers import AutoencoderKL

    from diffrt.train.dreambooth import scale_latents

    vae = AutoencoderKL.from_pretrained(sd_folder / "vae", shift_factor=0.5)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    decoded_as = scale_latents(vae, z) / vae.config.scaling_factor  # TextToImagePipeline: latents / vae_scaling_factor
    torch.testing.assert_close(decoded_as, z)


def _pipeline(folder: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe) -> np.ndarray:
    return pipe("a photo of sks cat", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_a_lora_saved_again_is_the_same_bytes(sd_folder, tmp_path):
    """Two saves of one LoRA wrote different bytes (and sha256s, which an export's manifest records): peft keeps
    target_modules as a set, written in the string hash seed's order, and safetensors writes its metadata entries in
    the order of a Rust HashMap seeded afresh for every file (about half of all saves came out the other way)."""
    import hashlib

    from diffusers import UNet2DConditionModel

    from diffrt.train.lora_adapters import add_lora, save_lora

    unet = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    config = add_lora(unet, 2, None, ("to_v", "to_q", "to_out.0", "to_k"), 0)
    digests = {hashlib.sha256(save_lora(tmp_path / str(i), unet, config).read_bytes()).hexdigest() for i in range(8)}
    assert len(digests) == 1
    with safe_open(tmp_path / "0" / LORA_WEIGHT_NAME, "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["unet.target_modules"] == ["to_k", "to_out.0", "to_q", "to_v"]


def test_dreambooth_lora_loads_in_diffusers(dreambooth_run, sd_folder):
    from diffrt.export.lora import read_lora
    from diffrt.export.lora_fuse import fuse_loras

    cfg, _ = dreambooth_run
    lora = Path(cfg.train.out) / LORA_WEIGHT_NAME
    pipe = _pipeline(sd_folder)
    base = _images(pipe)
    pipe.load_lora_weights(lora, adapter_name="sks")
    adapted = _images(pipe)
    assert np.abs(adapted - base).max() > 1e-3
    # alpha 8 / rank 4 comes through the file's metadata.
    assert pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.scaling["sks"] == 2.0
    pipe.set_adapters(["sks"], [0.0])
    np.testing.assert_array_equal(_images(pipe), base)

    # `diffrt export --lora` reads the same file to the same weights as diffusers' fuse_lora.
    pipe.set_adapters(["sks"], [1.0])
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    pipe.unload_lora_weights()
    ours = _pipeline(sd_folder)
    fuse_loras({"unet": ours.unet, "text_encoder": ours.text_encoder}, [(read_lora(lora), 1.0)])
    for name in ("unet", "text_encoder"):
        theirs = dict(getattr(pipe, name).state_dict())
        for key, value in getattr(ours, name).state_dict().items():
            torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6)


def test_dreambooth_loss_goes_down(sd_folder, cat_folder, tmp_path):
    """Adapting conv_in and conv_out as well as attention (conv LoRA through peft), the subject's
    loss falls within a few dozen steps; the file still loads in diffusers."""
    cfg = DreamBoothConfig(
        model=str(sd_folder), instance_data=str(cat_folder), instance_prompt="a photo of sks cat", rank=4, resolution=32,
        target_modules=("to_q", "to_k", "to_v", "to_out.0", "conv_in", "conv_out"), num_validation_images=1,
        inference_steps=1, train=train_config(tmp_path, max_steps=40, batch_size=4, learning_rate=1e-2, checkpoint_every=40),
    )
    result = train_dreambooth_lora(cfg)
    assert_loss_goes_down(result.losses, factor=0.85)
    pipe = _pipeline(sd_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # peft warns when the file misses layers that its config names
        pipe.load_lora_weights(tmp_path / LORA_WEIGHT_NAME, adapter_name="sks")
    adapted = {name: m for name, m in pipe.unet.named_modules() if hasattr(m, "lora_B")}
    assert "conv_in" in adapted and "conv_out" in adapted and len(adapted) == 2 + 4 * 2 * 4  # 4 transformer blocks
    assert all(m.lora_B["sks"].weight.abs().max() > 0 for m in adapted.values())  # every layer arrived trained


def test_dreambooth_default_targets_lower_a_fixed_evaluation_loss(sd_folder, cat_folder, tmp_path):
    """With LoRA on the attention projections only, the training loss of a 40-step run on the
    tiny model is all sampling noise (random timesteps and noise per step). The same loss at fixed
    timesteps and noise, before and after training, shows the subject being learned."""
    from diffrt.data import load_image_folder
    from diffrt.train.dreambooth import instance_evaluation_loss

    prompt = "a photo of sks cat"
    cfg = DreamBoothConfig(model=str(sd_folder), instance_data=str(cat_folder), instance_prompt=prompt, rank=4,
                           resolution=32, num_validation_images=1, inference_steps=1,
                           train=train_config(tmp_path, max_steps=40, batch_size=4, learning_rate=1e-2, checkpoint_every=40))
    assert cfg.target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    train_dreambooth_lora(cfg)
    images = load_image_folder(cat_folder, 32).images
    pipe = _pipeline(sd_folder)
    before = instance_evaluation_loss(pipe, images, prompt)
    assert instance_evaluation_loss(pipe, images, prompt) == before  # the same draws every call
    pipe.load_lora_weights(tmp_path / LORA_WEIGHT_NAME)
    after = instance_evaluation_loss(pipe, images, prompt)
    assert after < 0.99 * before, f"fixed evaluation loss {before:.4f} -> {after:.4f}"


def test_dreambooth_base_dtype_follows_mixed_precision_and_lora_stays_fp32(sd_folder):
    """A half base only with autocast (and fp16's loss scaler): "no" on a GPU keeps it fp32, as
    diffusers' train_dreambooth_lora.py does. peft creates adapters in the base layer's dtype;
    add_lora casts the trainable ones back to fp32 (diffusers' cast_training_params)."""
    from diffrt.train.dreambooth import base_dtype, load_components
    from diffrt.train.lora_adapters import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [base_dtype(cuda, mp) for mp in ("no", "fp16", "bf16")] == [torch.float32, torch.float16, torch.bfloat16]
    assert {base_dtype(cpu, mp) for mp in ("no", "fp16", "bf16")} == {torch.float32}
    c = load_components(sd_folder, cpu, torch.float16)
    for model, targets in ((c.unet, UNET_TARGETS), (c.text_encoder, TEXT_ENCODER_TARGETS)):
        add_lora(model, 2, None, targets, seed=0)
        lora = [p for name, p in model.named_parameters() if ".lora_" in name]
        assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
        assert all(p.dtype == torch.float16 and not p.requires_grad for name, p in model.named_parameters() if ".lora_" not in name)


def test_gradient_checkpointing_keeps_the_lora_gradients(sd_folder):
    """Checkpointed UNet and text-encoder blocks recompute their forward in the backward pass; the
    LoRA parameters inside them (behind frozen inputs) must get the same gradients as without."""
    from diffrt.train.dreambooth import encode_prompt, load_components, tokenize
    from diffrt.train.lora_adapters import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora

    c = load_components(sd_folder, torch.device("cpu"), torch.float32)
    add_lora(c.unet, 2, None, UNET_TARGETS, seed=0)
    add_lora(c.text_encoder, 2, None, TEXT_ENCODER_TARGETS, seed=1)
    lora = {f"{m}.{n}": p for m, model in (("unet", c.unet), ("te", c.text_encoder))
            for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # lora_B starts at zero, which would leave lora_A without a gradient
        for name, p in lora.items():
            if ".lora_B." in name:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    c.unet.train()
    c.text_encoder.train()
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))

    def lora_grads() -> dict[str, torch.Tensor]:
        for p in lora.values():
            p.grad = None
        cond = encode_prompt(c, tokenize(c.tokenizer, "a photo of sks cat")).expand(2, -1, -1)
        c.unet(x, torch.tensor([10, 500]), cond).sample.square().mean().backward()
        return {k: p.grad.clone() for k, p in lora.items()}

    plain = lora_grads()
    c.unet.enable_gradient_checkpointing()
    c.text_encoder.gradient_checkpointing_enable()
    checkpointed = lora_grads()
    assert all(g.abs().max() > 0 for g in checkpointed.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_dreambooth_on_a_half_base_under_autocast(sd_folder, cat_folder, tmp_path, monkeypatch):
    """The GPU layout on the CPU: a bf16 base (VAE, text encoder, UNet) under bf16 autocast, fp32
    LoRA on both models, gradient checkpointing, EMA; every adapter trains and the file loads."""
    import diffrt.train.dreambooth as dreambooth

    loaded, load_components = {}, dreambooth.load_components
    monkeypatch.setattr(dreambooth, "base_dtype", lambda device, mixed_precision: torch.bfloat16)
    monkeypatch.setattr(dreambooth, "load_components", lambda *a: loaded.setdefault("c", load_components(*a)))
    cfg = DreamBoothConfig(model=str(sd_folder), instance_data=str(cat_folder), instance_prompt="a photo of sks cat",
                           rank=2, train_text_encoder=True, resolution=32, num_validation_images=1, inference_steps=1,
                           train=train_config(tmp_path, max_steps=2, batch_size=2, mixed_precision="bf16",
                                              gradient_checkpointing=True, ema_decay=0.5, checkpoint_every=2))
    result = train_dreambooth_lora(cfg)
    c = loaded["c"]
    assert c.vae.dtype == c.text_encoder.dtype == c.unet.conv_in.weight.dtype == torch.bfloat16
    assert all(np.isfinite(result.losses))
    for model in (c.unet, c.text_encoder):
        lora_b = [p for name, p in model.named_parameters() if ".lora_B." in name]
        assert lora_b and all(p.dtype == torch.float32 and p.abs().max() > 0 for p in lora_b)  # from zero: trained
    weights = load_file(tmp_path / "checkpoints" / "step-0000002" / "weights.safetensors")
    assert all(v.dtype == torch.float32 for v in weights.values())
    _pipeline(sd_folder).load_lora_weights(tmp_path / LORA_WEIGHT_NAME)


@pytest.mark.gpu
@pytest.mark.parametrize("mixed_precision, half", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dreambooth_on_gpu_keeps_the_base_in_half_and_lora_in_fp32(mixed_precision, half, sd_folder, cat_folder, tmp_path,
                                                                    monkeypatch):
    """The GPU layout: the frozen base (UNet, VAE, text encoder) in half precision on the GPU, both models' LoRA in
    fp32 and trained, with prior preservation's class images drawn by the half base, gradient checkpointing and
    validation grids; the saved LoRA is fp32 and loads in diffusers. (A review found the fp16 test would pass a run
    whose steps the loss scaler all skipped, and no bf16 run on a GPU.)"""
    import diffrt.train.dreambooth as dreambooth
    from PIL import Image

    loaded, load_components = {}, dreambooth.load_components
    monkeypatch.setattr(dreambooth, "load_components", lambda *a: loaded.setdefault("c", load_components(*a)))
    cfg = dreambooth_config(sd_folder, cat_folder, tmp_path / "out", tmp_path / "class_images", max_steps=2,
                            mixed_precision=mixed_precision, gradient_checkpointing=True, checkpoint_every=2, sample_every=2)
    result = train_dreambooth_lora(cfg)
    c = loaded["c"]
    assert c.device.type == "cuda" and c.unet.conv_in.weight.dtype == c.vae.dtype == c.text_encoder.dtype == half
    assert all(np.isfinite(result.losses))
    for model in (c.unet, c.text_encoder):
        lora = {name: p for name, p in model.named_parameters() if ".lora_" in name}
        assert lora and all(p.dtype == torch.float32 and p.is_cuda and p.requires_grad for p in lora.values())
        assert all(p.abs().max() > 0 for name, p in lora.items() if ".lora_B." in name)  # from zero: steps were taken
    for path in (tmp_path / "out" / "checkpoints" / "step-0000002" / "weights.safetensors", tmp_path / "out" / LORA_WEIGHT_NAME):
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in load_file(path).values()), path
    for path in [*sorted((tmp_path / "class_images").glob("*.png")), tmp_path / "out" / "samples" / "step-0000002.png"]:
        assert np.asarray(Image.open(path).convert("L")).std() > 1, path  # drawn by the half base: not one flat colour
    _pipeline(sd_folder).load_lora_weights(tmp_path / "out" / LORA_WEIGHT_NAME)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("fc1", "fc2")], ids=["attention", "mlp-only"])
def test_cli_text_encoder_target_modules(sd_folder, tmp_path, targets):
    """The file loads in diffusers whatever the text encoder's targets, to the weights diffrt fuses from it (a review's:
    an MLP-only adapter kept peft's names, and diffusers could not tell the file's format)."""
    from diffrt.export.lora import read_lora
    from diffrt.export.lora_fuse import fuse_loras

    out = tmp_path / "db"  # on the bundled subject, as README's example
    assert main(["train", "dreambooth-lora", "--model", str(sd_folder), "--instance-data", "chelsea",
                 "--instance-prompt", "a photo of sks cat", "--resolution", "32", "--rank", "2", "--train-text-encoder",
                 "--text-encoder-target-modules", *targets, "--num-validation-images", "1", "--inference-steps", "1",
                 "--max-steps", "1", "--batch-size", "1", "--out", str(out)]) == 0
    adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in load_file(out / LORA_WEIGHT_NAME) if k.startswith("text_encoder.")}
    assert adapted == set(targets)
    pipe = _pipeline(sd_folder)
    pipe.load_lora_weights(out / LORA_WEIGHT_NAME)
    pipe.fuse_lora(components=["text_encoder"], lora_scale=1.0)
    pipe.unload_lora_weights()
    ours = _pipeline(sd_folder)
    fuse_loras({"unet": ours.unet, "text_encoder": ours.text_encoder}, [(read_lora(out / LORA_WEIGHT_NAME), 1.0)])
    theirs, base = dict(pipe.text_encoder.state_dict()), dict(_pipeline(sd_folder).text_encoder.state_dict())
    changed = [key for key, value in ours.text_encoder.state_dict().items() if not torch.equal(value, base[key])]
    assert changed and all(key.rsplit(".", 2)[-2] in targets for key in changed)
    for key, value in ours.text_encoder.state_dict().items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6)


def test_cli_lora_dropout_and_class_image_batches(sd_folder, tmp_path, capsys):
    """--lora-dropout reaches peft's layers and the file's metadata (which diffusers loads); --sample-batch-size makes
    the class images in batches of that many, each image with its own seed."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "db"
    assert main(["train", "dreambooth-lora", "--model", str(sd_folder), "--instance-data", "chelsea",
                 "--instance-prompt", "a photo of sks cat", "--resolution", "32", "--rank", "2", "--train-text-encoder",
                 "--lora-dropout", "0.25", "--with-prior-preservation", "--class-prompt", "a photo of a cat",
                 "--num-class-images", "3", "--sample-batch-size", "2", "--num-validation-images", "1",
                 "--inference-steps", "1", "--class-inference-steps", "1", "--max-steps", "1", "--batch-size", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "class_images").iterdir()) == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert re.search(r"class images: 100%\|[^|]*\| 2/2 ", capsys.readouterr().err)  # 3 images in batches of 2, 1
    with safe_open(out / LORA_WEIGHT_NAME, "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["unet.lora_dropout"] == metadata["text_encoder.lora_dropout"] == 0.25
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.load_lora_weights(out / LORA_WEIGHT_NAME)
    dropouts = {m.p for name, m in pipe.unet.named_modules() if ".lora_dropout." in name}  # diffusers names it default_0
    assert dropouts == {0.25}


def test_cli_runs_each_trainer(sd_folder, cat_folder, tmp_path, capsys):
    pixel = save_pretrained_pixel_model(tmp_path / "pixel")
    common = ["--max-steps", "2", "--batch-size", "2", "--checkpoint-every", "2", "--lr-warmup-steps", "0"]
    assert main(["train", "finetune", "--model", str(pixel), "--data", str(cat_folder), "--out", str(tmp_path / "ft"),
                 "--random-flip", *common, "--checkpoint-every", "1", "--checkpoints-total-limit", "1",
                 "--snr-gamma", "5", "--noise-offset", "0.05", "--lr-schedule", "linear", "--adam-weight-decay", "0",
                 "--adam-beta2", "0.99"]) == 0
    assert (tmp_path / "ft" / "model" / "unet" / "config.json").is_file()
    assert [p.name for p in list_checkpoints(tmp_path / "ft" / "checkpoints")] == ["step-0000002"]
    saved = json.loads((tmp_path / "ft" / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert {k: saved["config"][k] for k in ("snr_gamma", "noise_offset", "lr_schedule", "weight_decay", "adam_beta2")} == {
        "snr_gamma": 5.0, "noise_offset": 0.05, "lr_schedule": "linear", "weight_decay": 0.0, "adam_beta2": 0.99}
    assert "trained 2 steps, " in capsys.readouterr().out
    # A --resume of the finished run trains nothing, says so, and marks the model's record as a resumed run's.
    assert main(["train", "finetune", "--model", str(pixel), "--data", str(cat_folder), "--out", str(tmp_path / "ft"),
                 "--random-flip", *common, "--checkpoint-every", "1", "--checkpoints-total-limit", "1", "--resume",
                 "--snr-gamma", "5", "--noise-offset", "0.05", "--lr-schedule", "linear", "--adam-weight-decay", "0",
                 "--adam-beta2", "0.99"]) == 0
    assert "nothing to train: the checkpoint is at step 2, the --max-steps" in capsys.readouterr().out
    assert json.loads((tmp_path / "ft" / "model" / "diffrt.json").read_text())["training"]["resumed"] is True
    assert main(["train", "dreambooth-lora", "--model", str(sd_folder), "--instance-data", str(cat_folder),
                 "--instance-prompt", "a photo of sks cat", "--resolution", "32", "--rank", "2",
                 "--validation-every", "1", "--num-validation-images", "1", "--inference-steps", "1",
                 "--out", str(tmp_path / "db"), *common]) == 0
    assert (tmp_path / "db" / LORA_WEIGHT_NAME).is_file()
    assert sorted(p.name for p in (tmp_path / "db" / "samples").iterdir()) == ["step-0000001.png", "step-0000002.png"]
    assert "samples/s" in capsys.readouterr().out


def test_a_full_disk_at_a_checkpoint_is_one_line_and_leaves_no_checkpoint(cat_folder, tmp_path):
    """The bug (a review's): safetensors reports a failed write as its own error type, not an OSError, so a full
    disk at a checkpoint ended in a traceback. The file size limit (RLIMIT_FSIZE) makes the write fail for real."""
    import subprocess
    import sys

    pixel = save_pretrained_pixel_model(tmp_path / "pixel")
    out = tmp_path / "run"
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # less than the UNet's weights\n"
        "from diffrt.cli import main\n"
        f"sys.exit(main(['train', 'finetune', '--model', {str(pixel)!r}, '--data', {str(cat_folder)!r}, '--out', {str(out)!r},"
        " '--max-steps', '1', '--batch-size', '2', '--lr-warmup-steps', '0']))\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    errors = [line for line in run.stderr.splitlines() if line.startswith("diffrt: error: ")]  # the step bar's line ended
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert len(errors) == 1 and "could not write" in errors[0] and "weights.safetensors" in errors[0], errors
    assert list_checkpoints(out / "checkpoints") == [] and not list((out / "checkpoints").iterdir())  # no temporaries


# -- bad input: one line, before any step ---------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, cat_folder) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "not_image").mkdir()
    shutil.copy(next(cat_folder.glob("*.png")), root / "not_image" / "good.png")
    (root / "not_image" / "notes.png").write_text("this is text, not a PNG")
    (root / "not_image_suffix").mkdir()
    shutil.copy(next(cat_folder.glob("*.png")), root / "not_image_suffix" / "good.png")
    (root / "not_image_suffix" / "captions.txt").write_text("a photo of sks cat")
    (root / "no_config").mkdir()
    (root / "no_config" / "README.md").write_text("weights elsewhere")
    (root / "unet_no_config" / "unet").mkdir(parents=True)
    (root / "classes").mkdir()
    for name in ("a", "b"):
        shutil.copytree(cat_folder, root / "classes" / name)
    shutil.copytree(root / "classes", root / "classes_link")
    (root / "classes_link" / "c").symlink_to(root / "unmounted" / "c")  # a class on a share not mounted
    save_pretrained_pixel_model(root / "pixel")
    with torch.random.fork_rng(devices=[]):
        save_pixel_model(build_pixel_model(small_unet_config(6, 3, (16, 32)), scheduler=DDIMConfig()), root / "pixel6")
    return root


def _cases(r: Path, cat: Path, sd: Path) -> dict[str, tuple[list[str], str]]:
    ft = ["train", "finetune", "--model", str(r / "pixel"), "--max-steps", "2", "--batch-size", "2"]
    db = ["train", "dreambooth-lora", "--model", str(sd), "--instance-data", str(cat),
          "--instance-prompt", "a photo of sks cat", "--resolution", "32", "--max-steps", "2"]
    return {
        "missing data folder": (ft + ["--data", str(r / "missing")], "data folder not found"),
        "empty data folder": (ft + ["--data", str(r / "empty")], "no images in"),
        "non-image file": (ft + ["--data", str(r / "not_image")], "notes.png is not a readable image"),
        "non-image file suffix": (db[:5] + [str(r / "not_image_suffix")] + db[6:], "captions.txt is not an image file"),
        "model folder without config": (["train", "finetune", "--model", str(r / "no_config"), "--data", str(cat)],
                                        "not a diffusers model folder"),
        "unet folder without config": (["train", "finetune", "--model", str(r / "unet_no_config"), "--data", str(cat)],
                                       "no unet/config.json"),
        "text-to-image model without components": (db[:3] + [str(r / "pixel")] + db[4:], "has no vae/config.json"),
        "rank < 1": (db + ["--rank", "0"], "--rank must be >= 1"),
        "checkpoints total limit < 1": (ft + ["--data", str(cat), "--checkpoints-total-limit", "0"],
                                        "--checkpoints-total-limit must be >= 1"),
        "empty instance folder": (db[:5] + [str(r / "empty")] + db[6:], "no images in"),
        "class folders != --num-classes": (["train", "class-cond", "--data", str(r / "classes"), "--num-classes", "3",
                                            "--resolution", "8", "--widths", "16", "32"], "--num-classes is 3"),
        # Sizes the sample grid's pipeline refuses failed at the grid after the last step, before the model was saved.
        "class-cond size the sampler refuses": (["train", "class-cond", "--resolution", "9", "--widths", "16", "32",
                                                 "--max-steps", "2", "--batch-size", "2"], "--resolution 9: diffrt samples"),
        "class-cond size the UNet cannot halve": (["train", "class-cond", "--resolution", "10", "--widths", "16", "32", "32",
                                                   "--max-steps", "2", "--batch-size", "2"], "multiples of 4 from 8 up"),
        "pixel model of a size the sampler refuses": (ft[:3] + [str(r / "pixel6")] + ft[4:] + ["--data", str(cat)],
                                                      "has sample_size 6: diffrt samples"),
        "class-cond size below one pixel": (["train", "class-cond", "--data", str(r / "classes"), "--resolution", "0"],
                                            "--resolution must be a positive number of pixels, got 0"),
        "class-cond widths outside the group norm": (["train", "class-cond", "--resolution", "8", "--widths", "12", "24"],
                                                     "--widths takes 1 to 3 block widths, each a multiple of 8"),
        "class-cond widths past three blocks": (["train", "class-cond", "--resolution", "16", "--widths", "16", "16", "16", "16"],
                                                "--widths takes 1 to 3 block widths"),
        # From a review: each ran (or loaded models) and then ended in a traceback.
        "validation steps past the training schedule": (db + ["--inference-steps", "1001"],
                                                        "--inference-steps 1001 is more than the model's 1000 training timesteps"),
        "class image steps past the training schedule": (db + ["--class-inference-steps", "1001"],
                                                         "--class-inference-steps 1001 is more than the model's 1000 training"),
        "class data folder that is a file": (db + ["--with-prior-preservation", "--class-prompt", "a cat",
                                                   "--class-data", str(r / "not_image_suffix" / "captions.txt")],
                                             "is a file; pass a folder"),
        "learning rate nan": (ft + ["--data", str(cat), "--learning-rate", "nan"], "--learning-rate must be a number > 0, got nan"),
        "gradient norm below 0": (ft + ["--data", str(cat), "--max-grad-norm", "-1"], "--max-grad-norm must be >= 0"),
        "adam beta1 of 1": (ft + ["--data", str(cat), "--adam-beta1", "1"], "--adam-beta1 must be in [0, 1), got 1.0"),
        "snr gamma of 0": (db + ["--snr-gamma", "0"], "--snr-gamma must be a number > 0"),
        "lora dropout of 1": (db + ["--lora-dropout", "1"], "--lora-dropout must be in [0, 1), got 1.0"),
        # From a review: NaN passed `<= 0` and the run stopped at step 1 blaming the learning rate.
        "lora alpha nan": (db + ["--lora-alpha", "nan"], "--lora-alpha must be > 0, got nan"),
        "class folder that links to nothing": (["train", "class-cond", "--data", str(r / "classes_link"), "--resolution", "8",
                                                "--widths", "16", "32"], "classes_link/c is a link to nothing"),
        "class data inside the instance data": (db + ["--with-prior-preservation", "--class-prompt", "a cat",
                                                      "--class-data", str(cat / "class")],
                                                f"--class-data {cat / 'class'} is inside the --instance-data folder {cat}"),
        # From a review: each passed the checks, then failed in step 1 (a GroupNorm traceback, tensorboard/ and the lock
        # file left behind), or in peft naming no flag.
        "dreambooth latents of one pixel": (db + ["--resolution", "8"],
                                            "--resolution 8 with --batch-size 1 leaves the UNet's deepest level one pixel"),
        "dreambooth size of one-value groups": (db + ["--resolution", "16"],
                                                "--resolution 16 with --batch-size 1 leaves the UNet's deepest level one pixel"),
        "empty target module name": (db + ["--target-modules", "to_q", ""], "--target-modules has an empty module name"),
        "class data at the model folder": (db + ["--with-prior-preservation", "--class-prompt", "a cat", "--class-data", str(sd)],
                                           f"--class-data {sd} is the --model folder {sd}"),
    }


@pytest.mark.parametrize("case", list(_cases(Path("."), Path("."), Path(".")).keys()))
def test_bad_input_fails_before_any_step(case, bad_inputs, cat_folder, sd_folder, tmp_path, capsys):
    argv, expected = _cases(bad_inputs, cat_folder, sd_folder)[case]
    out = tmp_path / "out"
    rc = main(argv + ["--out", str(out)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("diffrt: error:")]
    assert rc == 2 and "Traceback" not in err
    assert len(errors) == 1 and expected in errors[0], err
    # Before any step: nothing of a run was made (a check inside the first step left the lock file and tensorboard/).
    assert not os.path.lexists(out), sorted(p.name for p in out.iterdir())


def test_an_out_name_not_in_utf8_is_refused_before_the_model_loads(bad_inputs, cat_folder, tmp_path, capsys):
    """The bug (a review's): an --out of other bytes than UTF-8 (b'out\xff', read by Python as a surrogate) trained
    up to TensorBoard's writer, which raised UnicodeEncodeError after the model and data had loaded, and left the
    lock file and an empty tensorboard/ behind."""
    out = os.fsdecode(bytes(tmp_path) + b"/out\xff")
    assert main(["train", "finetune", "--model", str(bad_inputs / "pixel"), "--data", str(cat_folder), "--max-steps", "1",
                 "--batch-size", "2", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "is not valid UTF-8" in err.splitlines()[-1]
    assert not os.path.lexists(out)


def test_out_overlapping_the_model_folder_is_refused(bad_inputs, sd_folder, cat_folder, tmp_path):
    """--model runs/a/model --out runs/a saved the fine-tuned model over its base (a README beside its
    weights was lost); an --out at or inside the model folder wrote the run's files among the model's."""
    base = tmp_path / "runs" / "model"
    shutil.copytree(bad_inputs / "pixel", base)
    (base / "README.md").write_text("how this model was made")
    before = sorted(p.name for p in base.iterdir())
    for out, match in ((tmp_path / "runs", "would replace the --model folder"), (base, "is the --model folder"),
                       (base / "unet", "is inside the --model folder")):
        with pytest.raises(DiffrtError, match=match) as err:
            finetune(FinetuneConfig(model=str(base), data=str(cat_folder), train=train_config(out, max_steps=1)))
        assert "\n" not in str(err.value)
    assert sorted(p.name for p in base.iterdir()) == before and not (tmp_path / "runs" / "loss.csv").exists()
    sd = tmp_path / "sd"
    shutil.copytree(sd_folder, sd)
    with pytest.raises(DiffrtError, match="is the --model folder"):
        train_dreambooth_lora(DreamBoothConfig(model=str(sd), instance_data=str(cat_folder), instance_prompt="a photo of sks cat",
                                               resolution=32, train=train_config(sd, max_steps=1)))
    assert not (sd / "loss.csv").exists() and not (sd / LORA_WEIGHT_NAME).exists()


def test_bad_input_raises_diffrt_error_from_the_library(bad_inputs, cat_folder, sd_folder, tmp_path):
    with pytest.raises(DiffrtError, match="rank must be >= 1"):
        train_dreambooth_lora(DreamBoothConfig(model=str(sd_folder), instance_data=str(cat_folder),
                                               instance_prompt="a photo of sks cat", rank=0, train=TrainConfig(out=str(tmp_path))))
    with pytest.raises(DiffrtError, match="notes.png"):
        finetune(FinetuneConfig(model=str(bad_inputs / "pixel"), data=str(bad_inputs / "not_image"),
                                train=TrainConfig(out=str(tmp_path))))
    with pytest.raises(DiffrtError, match="match no module of the UNet"):
        train_dreambooth_lora(DreamBoothConfig(model=str(sd_folder), instance_data=str(cat_folder), resolution=32,
                                               instance_prompt="a photo of sks cat", target_modules=("to_qq",),
                                               train=TrainConfig(out=str(tmp_path))))
    assert not (tmp_path / "loss.csv").exists()


def test_data_parallel_ranks_stay_in_step(tmp_path):
    """Two CPU processes (torchrun, gloo) train on different data; the loop averages their
    gradients, so both end with the same weights (without the averaging they drift by ~0.25).
    First, gradients of mixed dtypes and sizes averaged in several small buckets come back as the
    ranks' mean, in place, whichever bucket each fell in."""
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    script = Path(__file__).parent / "scripts" / "ddp_train.py"
    out = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "ddp"), "buckets"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("BUCKETS=error 0.000e+00 in_place True none_kept True") == 2, out.stdout
    assert out.stdout.count("IMAGES_PER_STEP=32.000") == 2, out.stdout  # samples/s is the run's, not one process's
    # And so is the loss logged: rank 0's own was logged, the loss of half the step's images.
    assert out.stdout.count("LOGGED_IS_THE_RANKS_MEAN=True ranks_differ=True") == 2, out.stdout
    spread = float(out.stdout.split("RANK_SPREAD=")[1].split()[0])
    assert spread == 0.0


def test_data_parallel_ranks_stop_together_when_one_diverges(tmp_path):
    """A NaN loss on one rank only: both stop at that step with the loop's error (one rank stopping alone would
    leave the other waiting in its next collective until a timeout)."""
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    script = Path(__file__).parent / "scripts" / "ddp_train.py"
    out = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "ddp"), "diverge"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("DIVERGED=") == 2, out.stdout  # one from each rank (their lines may interleave)
    # Rank 1's own loss is NaN, rank 0's finite: the run's loss, their mean, is NaN on both.
    assert out.stdout.count("the loss at step 3 is nan") == 2, out.stdout


def test_a_second_run_into_an_out_in_use_is_refused_until_the_first_ends(tmp_path):
    """A run still going in --out (a scheduler retrying a job that is not dead): a second run, fresh or --resume,
    is refused in one line naming the first's process, before it writes anything (it would delete the first's
    staged checkpoint as a killed save's leftover). Killed, the first holds nothing: --resume then continues it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = ["train", "class-cond", "--resolution", "8", "--widths", "16", "32", "--batch-size", "2", "--checkpoint-every", "1",
            "--log-every", "1", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "diffrt.cli", *args, "--max-steps", "1000000"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(out / "checkpoints"):
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first run saved no checkpoint in 120 s"
            time.sleep(0.2)
        for resume in (False, True):
            with pytest.raises(DiffrtError, match=rf"^{re.escape(str(out))} is in use by another training run "
                                                  rf"\(process {first.pid}\): wait for it to end, or pass another --out$"):
                train_class_conditioned(class_cond_config(out, "class_embedding", resume=resume))
        assert not (out / "model").exists()
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        first.stderr.close()
    saved = int(list_checkpoints(out / "checkpoints")[-1].name.split("-")[1])
    assert main([*args, "--max-steps", str(saved + 2), "--resume"]) == 0
    assert read_loss_csv(out)[-1][0] == saved + 2
    assert (out / "model").is_dir()


@pytest.mark.parametrize("signalled", ["rank1", "all", "rank1-in-update"])
def test_data_parallel_ranks_stop_together_on_a_signal(signalled, tmp_path):
    """SIGTERM to one process of a data-parallel run, or to all: every process stops after the same step (one
    stopping alone would leave the others waiting), and the main one saves that step's checkpoint, slowly here,
    while the others wait for it (each process then ends as the CLI does, by the signal; a launcher seeing one
    end signals the rest, and a second SIGTERM must not cost the checkpoint). A signal during the optimizer's update
    stops after that step too (a review found a vote taken before the update stopped a step late)."""
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    script = Path(__file__).parent / "scripts" / "ddp_train.py"
    out = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "ddp"),
                          f"stop-{signalled}"], capture_output=True, text=True, timeout=300)
    assert out.stdout.count("STOPPED=stopped by SIGTERM after step 3 of 5") == 1, out.stdout + out.stderr[-2000:]
    # The other process stops as well, quietly: the CLI prints the main one's line only (each printed it).
    assert out.stdout.count("STOPPED=(quiet) stopped by SIGTERM after step 3 of 5") == 1, out.stdout + out.stderr[-2000:]
    ckpts = list_checkpoints(tmp_path / "ddp" / "checkpoints")
    assert [p.name for p in ckpts] == ["step-0000003"] and verify_checkpoint(ckpts[0]) is not None


def test_cli_stopped_by_sigterm_ends_by_it_with_its_checkpoint(tmp_path):
    """`diffrt train` under a job scheduler that preempts it: one line, the process ends by SIGTERM (a shell's 143),
    as a shell expects of a child it signalled, and the job's next attempt, the same command (`--resume auto`, which
    started the first as a new run), goes on."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = ["train", "class-cond", "--resolution", "8", "--widths", "16", "32", "--batch-size", "2", "--log-every", "1",
            "--resume", "auto", "--out", str(out)]
    run = subprocess.Popen([sys.executable, "-m", "diffrt.cli", *args, "--max-steps", "1000000"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "loss.csv").exists():
            assert run.poll() is None, run.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the run logged no step in 120 s"
            time.sleep(0.2)
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.kill(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == -signal.SIGTERM, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    step = int(re.fullmatch(r"diffrt: stopped by SIGTERM after step (\d+) of 1000000: saved .*; --resume continues the "
                            r"run \(with --max-steps \1, it saves the result as it is now\)", last).group(1))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [f"step-{step:07d}"]
    # The command's log lines go above the progress bar, not onto the end of its line.
    assert any(line.startswith("WARNING diffrt.train.stop: SIGTERM: the run stops after the step under way")
               for line in stderr.replace("\r", "\n").splitlines()), stderr[-2000:]
    assert main([*args, "--max-steps", str(step + 1)]) == 0
    assert [s for s, _ in read_loss_csv(out)] == list(range(1, step + 2))


def test_ctrl_c_on_a_script_of_runs_stops_the_script(tmp_path):
    """Ctrl-C signals the terminal's whole process group: a shell script running `diffrt train` twice must stop,
    not go on to the second run. bash does so only for a child that died of SIGINT, not one that exited 130."""
    import os
    import signal
    import subprocess
    import sys
    import time

    diffrt = Path(sys.executable).parent / "diffrt"
    runs = [f"{diffrt} train class-cond --resolution 8 --widths 16 32 --batch-size 2 --log-every 1 --max-steps 1000000 "
            f"--out {tmp_path / name}" for name in ("first", "second")]
    script = subprocess.Popen(["bash", "-c", f"{runs[0]}; {runs[1]}"], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "first" / "loss.csv").exists():
            assert script.poll() is None, script.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the first run logged no step in 120 s"
            time.sleep(0.2)
        os.killpg(script.pid, signal.SIGINT)
        _, stderr = script.communicate(timeout=120)
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()
    assert "diffrt: stopped by SIGINT after step" in stderr, stderr[-2000:]
    assert list_checkpoints(tmp_path / "first" / "checkpoints")
    assert not (tmp_path / "second").exists() and script.returncode == -signal.SIGINT


# -- class folders, resume checks -------------------------------------------------------------------


def test_class_cond_on_class_folders(bad_inputs, tmp_path):
    """A data folder with one sub-folder per class (two here) trains a two-class model."""
    cfg = ClassCondConfig(data=str(bad_inputs / "classes"), sample_size=8, widths=(16, 32), sample_steps=1,
                          train=train_config(tmp_path, max_steps=2, batch_size=4, checkpoint_every=2))
    result = train_class_conditioned(cfg)
    assert len(result.losses) == 2 and np.isfinite(result.losses).all()
    model = load_pixel_model(tmp_path / "model")
    assert model.info.num_classes == 2 and model.info.class_names == ["a", "b"]


def test_class_cond_default_grid_is_the_shipped_models(shipped_model_dir):
    """The class-cond trainer's final grid at its default settings, drawn from the shipped digits
    model, is the training_samples.png its README says the README's command made (CFG 3)."""
    from PIL import Image

    from diffrt.images import make_grid, to_uint8
    from diffrt.train.pixel import pixel_sample_fn

    defaults = ClassCondConfig()
    images = pixel_sample_fn(load_pixel_model(shipped_model_dir), defaults.sample_steps, defaults.sample_guidance_scale)()
    grid = to_uint8(make_grid(images, nrow=8, scale=64 // images.shape[-1])[None])[0].astype(np.int16)
    shipped = np.asarray(Image.open(shipped_model_dir / "training_samples.png").convert("RGB"), dtype=np.int16)
    assert grid.shape == shipped.shape
    assert np.abs(grid - shipped).mean() < 0.5  # CFG 2 instead of 3: about 16


def test_resume_with_other_settings_fails_clearly(class_cond_runs, tmp_path):
    """--resume names each setting that differs from the checkpoint's; run length may change."""
    out = tmp_path / "run"
    shutil.copytree(class_cond_runs["class_embedding"][0], out)
    cfg = class_cond_config(out, "class_embedding", resume=True, batch_size=8)
    with pytest.raises(DiffrtError) as err:
        train_class_conditioned(replace(cfg, widths=(16, 64)))
    message = str(err.value)
    assert "\n" not in message and "--resume" in message
    assert "batch_size: 16 saved vs 8 now" in message and "widths: [16, 32] saved vs [16, 64] now" in message
    assert "max_steps" not in message and "out:" not in message  # free to change (and out did change)
    assert [s for s, _ in read_loss_csv(out)] == list(range(1, STEPS + 1))  # nothing ran


def test_resume_by_another_trainer_is_refused(class_cond_runs, tmp_path):
    """The class-cond run's model, fine-tuned from its own checkpoint folder: each trainer compared only its own
    section of the state, so the finetune trainer would have taken the class-cond checkpoint as its own."""
    out = tmp_path / "run"
    shutil.copytree(class_cond_runs["class_embedding"][0], out)
    base = shutil.copytree(out / "model", tmp_path / "base")
    with pytest.raises(DiffrtError, match=r"--resume: .*step-\d{7} is a checkpoint of `diffrt train class-cond`, not finetune; "
                                          r"resume it with `diffrt train class-cond --resume`") as err:
        finetune(FinetuneConfig(model=str(base), data="digits", train=train_config(out, resume=True, ema_decay=0.9)))
    assert "\n" not in str(err.value)


def test_resume_refuses_a_data_folder_with_images_added(bad_inputs, sd_folder, cat_folder, tmp_path):
    """Each step draws its image indices below the data's image count, and the checkpoint held only the
    folder's name: with an image added, --resume went on quietly drawing other batches than the run it
    continued. The count is recorded now, and the files' content, and a --resume on other data is refused by name."""
    data = tmp_path / "data"
    shutil.copytree(cat_folder, data)
    ft = FinetuneConfig(model=str(bad_inputs / "pixel"), data=str(data), num_samples=1, sample_steps=1,
                        train=train_config(tmp_path / "ft", max_steps=1, batch_size=2, checkpoint_every=1))
    finetune(ft)
    db = DreamBoothConfig(model=str(sd_folder), instance_data=str(data), instance_prompt="a photo of sks cat", rank=2,
                          resolution=32, num_validation_images=1, inference_steps=1,
                          train=train_config(tmp_path / "db", max_steps=1, batch_size=1, checkpoint_every=1))
    train_dreambooth_lora(db)
    shutil.copy(data / "chelsea-0.png", data / "chelsea-4.png")
    with pytest.raises(DiffrtError, match="num_images: 4 saved vs 5 now"):
        finetune(replace(ft, train=replace(ft.train, max_steps=2, resume=True)))
    with pytest.raises(DiffrtError, match="num_instance_images: 4 saved vs 5 now"):
        train_dreambooth_lora(replace(db, train=replace(db.train, max_steps=2, resume=True)))
    (data / "chelsea-4.png").unlink()
    # From a review: the same names and count, another picture under one of them (replaced, edited) went on quietly.
    original = (data / "chelsea-0.png").read_bytes()
    shutil.copy(data / "chelsea-1.png", data / "chelsea-0.png")
    with pytest.raises(DiffrtError, match=r"data_content: '[0-9a-f]{16}' saved vs '[0-9a-f]{16}' now"):
        finetune(replace(ft, train=replace(ft.train, max_steps=2, resume=True)))
    with pytest.raises(DiffrtError, match=r"instance_content: '[0-9a-f]{16}' saved vs '[0-9a-f]{16}' now"):
        train_dreambooth_lora(replace(db, train=replace(db.train, max_steps=2, resume=True)))
    (data / "chelsea-0.png").write_bytes(original)
    assert len(finetune(replace(ft, train=replace(ft.train, max_steps=2, resume=True))).losses) == 1


def test_resume_takes_relative_folders_from_another_directory(bad_inputs, cat_folder, tmp_path, monkeypatch, capsys):
    """The bug (a review's): a checkpoint kept --model and --data as typed, and a --resume compared them from its own
    directory: a run started in job/ with --data imgs could not be resumed from anywhere else, the absolute paths
    refused as "'imgs' saved vs '/.../job/imgs' now". The checkpoint records where the folders were."""
    job = tmp_path / "job"
    job.mkdir()
    shutil.copytree(bad_inputs / "pixel", job / "pix")
    shutil.copytree(cat_folder, job / "imgs")
    (tmp_path / "elsewhere" / "imgs").mkdir(parents=True)
    shutil.copy(cat_folder / "chelsea-0.png", tmp_path / "elsewhere" / "imgs")
    args = ["train", "finetune", "--batch-size", "2", "--lr-warmup-steps", "0"]
    monkeypatch.chdir(job)
    assert main([*args, "--model", "pix", "--data", "imgs", "--out", "run", "--max-steps", "1"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--model", str(job / "pix"), "--data", "job/imgs/", "--out", str(job / "run"),
                 "--max-steps", "2", "--resume"]) == 0
    # Spelled as saved from another directory, where it names another folder: refused (the run's folder is there).
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main([*args, "--model", str(job / "pix"), "--data", "imgs", "--out", str(job / "run"), "--max-steps", "3",
                 "--resume"]) == 2
    assert "data: 'job/imgs/' saved vs 'imgs' now; num_images: 4 saved vs 1 now" in capsys.readouterr().err  # the resume's spelling


def test_dreambooth_trains_at_the_models_own_size_by_default(t2i_folder):
    """Without --resolution, DreamBooth (and its class images) use the pipeline's own size, read from
    its configs (512 for SD-1.5), not a fixed 512 that would make a 32-pixel model generate 16x the pixels."""
    from diffrt.text_to_image_models import load_text_to_image
    from diffrt.train.dreambooth import model_resolution

    assert model_resolution(t2i_folder) == load_text_to_image(t2i_folder, weights=False).default_size == 32


def test_dreambooths_python_defaults_train_as_its_command_does(tmp_path):
    """From a review: DreamBoothConfig's default TrainConfig left lr_schedule at TrainConfig's cosine, so a run from
    Python decayed its learning rate to 0 where `diffrt train dreambooth-lora` (and diffusers' recipe) holds 1e-4."""
    from diffrt.cli import build_parser

    args = build_parser().parse_args(["train", "dreambooth-lora", "--model", "m", "--instance-data", "d",
                                      "--instance-prompt", "a photo of sks cat"])
    python = DreamBoothConfig(model="m", instance_data="d", instance_prompt="a photo of sks cat").train
    for name in ("learning_rate", "lr_schedule", "lr_warmup_steps", "max_steps", "batch_size"):
        assert getattr(python, name) == getattr(args, name), name
    assert python.lr_schedule == "constant"


def test_a_checkpoint_naming_other_files_is_not_trusted_nor_hashed_for_ever(tmp_path):
    """From two security reviews: state.json's file list was hashed as given, so one naming /dev/zero (or a FIFO)
    hung --resume, and ../ reached outside the run; a FIFO as state.json, or as a file the loader read without its
    being listed, hung it too. Only save_checkpoint's files, regular, in the checkpoint, all that is read listed."""
    import threading

    from diffrt import atomic

    ckpt = tmp_path / "checkpoints" / "step-0000005"
    ckpt.mkdir(parents=True)
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    good = {}
    for name in ("weights.safetensors", "optimizer.safetensors"):
        (ckpt / name).write_bytes(name.encode())
        good[name] = atomic.sha256_file(ckpt / name)
    os.mkfifo(ckpt / "ema.safetensors")

    def verified(files: dict | None, state: str = "state.json"):
        if files is not None:
            (ckpt / state).write_text(json.dumps({"step": 5, "files": files, "param_groups": []}))
        results = []
        worker = threading.Thread(target=lambda: results.append(verify_checkpoint(ckpt)), daemon=True)
        worker.start()
        worker.join(10)
        assert not worker.is_alive(), files  # answered, not reading for ever
        return results[0]

    assert verified(good) is not None  # the good ones, listed: trusted
    for extra in ({"/dev/zero": "00"}, {"../../outside.safetensors": atomic.sha256_file(tmp_path / "outside.safetensors")},
                  {"ema.safetensors": "00"}):
        assert verified({**good, **extra}) is None, extra
    assert verified({"weights.safetensors": good["weights.safetensors"]}) is None  # the optimizer read, unlisted
    (ckpt / "state.json").unlink()
    os.mkfifo(ckpt / "state.json")
    assert verified(None) is None


def test_a_class_image_removed_from_the_folder_is_made_again_as_it_was(sd_folder, cat_folder, tmp_path):
    """From a review: class-k.png had the seed of its place in the count, so refilling a folder with a gap (a bad prior
    deleted) wrote a copy of the next image under the free name: two equal priors, and a --resume refused after the
    generation. Now class-k.png always has seed k: the image made again is the one removed."""
    import io

    from PIL import Image

    from diffrt.train.dreambooth import generate_class_images, load_components

    cfg = DreamBoothConfig(model=str(sd_folder), instance_data=str(cat_folder), instance_prompt="a photo of sks cat",
                           class_prompt="a photo of a cat", with_prior_preservation=True, num_class_images=3,
                           class_inference_steps=2, resolution=32, train=train_config(tmp_path / "out"))
    components = load_components(Path(sd_folder), torch.device("cpu"), torch.float32)
    folder = tmp_path / "class_images"
    generate_class_images(components, folder, cfg, batch=2)
    first = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    assert list(first) == ["class-00000.png", "class-00001.png", "class-00002.png"] and len(set(first.values())) == 3
    (folder / "class-00001.png").unlink()
    generate_class_images(components, folder, cfg, batch=2)
    again = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    assert list(again) == list(first) and again["class-00000.png"] == first["class-00000.png"]
    pixels = {name: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int) for name, data in again.items()}
    before = np.asarray(Image.open(io.BytesIO(first["class-00001.png"])).convert("RGB")).astype(int)
    # The same seed alone in its batch, not beside image 0: equal up to the batch's rounding (a level or two).
    assert np.abs(pixels["class-00001.png"] - before).max() <= 2
    assert np.abs(pixels["class-00001.png"] - pixels["class-00002.png"]).max() > 20  # not a copy of its neighbour


def test_a_resume_missing_class_images_says_so_before_making_them(sd_folder, cat_folder, tmp_path, caplog):
    """From the same review: the resume's refusal came after the generation (minutes to hours of the base model)."""
    out = tmp_path / "out"

    def config(max_steps: int, resume: bool) -> DreamBoothConfig:
        return DreamBoothConfig(model=str(sd_folder), instance_data=str(cat_folder), instance_prompt="a photo of sks cat",
                                class_prompt="a photo of a cat", with_prior_preservation=True, num_class_images=2,
                                class_inference_steps=1, resolution=32, rank=2, num_validation_images=1, inference_steps=1,
                                train=train_config(out, max_steps=max_steps, batch_size=1, checkpoint_every=1, resume=resume))

    train_dreambooth_lora(config(1, False))
    (out / "class_images" / "class-00001.png").unlink()
    with caplog.at_level("INFO", logger="diffrt.train.dreambooth"):
        try:
            train_dreambooth_lora(config(2, True))
        except DiffrtError as refused:  # made alone, not beside image 0: its bytes may differ, and the resume is refused
            assert "class_content" in str(refused)
    warned = [r for r in caplog.records if "class images missing" in r.getMessage()]
    assert warned and "resuming with 1 of the 2 class images missing" in warned[0].getMessage()
    made = [r for r in caplog.records if "generating 1 class images" in r.getMessage()]
    assert made and caplog.records.index(warned[0]) < caplog.records.index(made[0])


@pytest.mark.parametrize("class_data, out", [("h/1", "h/1"), ("h2", "h2/run"), ("h3/run/checkpoints", "h3/run")],
                         ids=["is out", "holds out", "inside out's checkpoints"])
def test_class_data_overlapping_out_is_refused_before_anything_is_made(class_data, out, sd_folder, cat_folder, tmp_path,
                                                                       monkeypatch, capsys):
    """The bug (a review's): class images were generated among the run's LoRA and checkpoints (or its files read as
    class images), and a later --resume failed with advice to delete the trained LoRA. Refused in one line naming
    --class-data; OUT/class_images, the default, and another folder of --out stay fine."""
    monkeypatch.chdir(tmp_path)
    argv = ["train", "dreambooth-lora", "--model", str(sd_folder), "--instance-data", str(cat_folder), "--instance-prompt",
            "a photo of sks cat", "--resolution", "32", "--max-steps", "1", "--with-prior-preservation", "--class-prompt",
            "a cat", "--class-data", class_data, "--out", out]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffrt: error:")]
    assert len(errors) == 1 and f"--class-data {class_data} " in errors[0] and f"the --out folder {out}: " in errors[0], errors
    assert list(tmp_path.iterdir()) == []  # nothing made
    for fine in ("run/class_images", "run/priors"):
        replace(dreambooth_config(sd_folder, cat_folder, Path("run"), Path(fine)), class_data=fine).validate()


@pytest.mark.parametrize("trainer, name, kind", [("class-cond", "model", "file"), ("dreambooth-lora", "class_images", "file"),
                                                  ("dreambooth-lora", LORA_WEIGHT_NAME, "folder")])
def test_what_the_run_writes_in_out_is_checked_before_it_starts(trainer, name, kind, sd_folder, tmp_path, capsys):
    """The bug (a review's): a file at OUT/class_images failed with Errno 17 when class images were made, a folder at
    OUT/pytorch_lora_weights.safetensors only after the last step, and a file named OUT/model was replaced without a
    word. Each is refused in one line, the file or folder left as it was."""
    argv = {"class-cond": ["train", "class-cond", "--resolution", "8", "--widths", "16", "32", "--max-steps", "1"],
            "dreambooth-lora": ["train", "dreambooth-lora", "--model", str(sd_folder), "--instance-data", "chelsea",
                                "--instance-prompt", "a photo of sks cat", "--resolution", "32", "--max-steps", "1",
                                "--with-prior-preservation", "--class-prompt", "a cat", "--num-class-images", "1"]}[trainer]
    out = tmp_path / "out"
    out.mkdir()
    if kind == "folder":
        (out / name).mkdir()
    else:
        (out / name).write_text("notes")
    assert main(argv + ["--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffrt: error:")]
    expected = (f"{name} is a file where the run keeps its {name}; move it" if kind == "file" else
                f"{name} is a folder where the run writes its {name}; move it")
    assert len(errors) == 1 and expected in errors[0], errors
    assert [p.name for p in out.iterdir()] == [name] and ((out / name).is_dir() or (out / name).read_text() == "notes")


def test_diffrt_json_records_the_rate_and_images_of_a_step_and_the_command_as_run(tmp_path, monkeypatch):
    """The bug (a review's): with --scale-lr, --gradient-accumulation-steps 2 and --batch-size 4, diffrt.json recorded
    learning_rate 0.001 and batch_size 4, while the run trained at 0.008 on 8 images a step; and under `python -m
    diffrt` its command was the path of diffrt/__main__.py, with its arguments unquoted."""
    import shlex

    import diffrt

    out = tmp_path / "a run"  # a space: quoted in the command
    argv = ["train", "class-cond", "--resolution", "8", "--widths", "16", "32", "--max-steps", "1", "--batch-size", "4",
            "--gradient-accumulation-steps", "2", "--scale-lr", "--lr-warmup-steps", "0", "--out", str(out)]
    monkeypatch.setattr("sys.argv", [str(Path(diffrt.__file__).parent / "__main__.py"), *argv])  # python -m diffrt
    assert main(argv) == 0
    training = json.loads((out / "model" / "diffrt.json").read_text())["training"]
    assert training["learning_rate"] == 1e-3 and training["peak_learning_rate"] == pytest.approx(1e-3 * 8)
    assert training["scale_lr"] is True  # the rate as given, which --scale-lr multiplies: a rerun from it scales it once
    assert training["batch_size"] == 4 and training["gradient_accumulation_steps"] == 2 and training["images_per_step"] == 8
    assert training["command"] == "diffrt " + shlex.join(argv) and shlex.split(training["command"])[1:] == argv


def _dreambooth_argv(sd_folder: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "dreambooth-lora", "--model", str(sd_folder), "--instance-data", "chelsea", "--instance-prompt",
            "a photo of sks cat", "--resolution", "32", "--rank", "2", "--num-validation-images", "1", "--inference-steps", "1",
            "--max-steps", "1", "--out", str(out), *extra]


def test_dreambooth_fp16_on_the_cpu_warns_once_records_fp32_and_resumes(sd_folder, tmp_path, caplog):
    """The bug (a review's): --mixed-precision fp16 on the CPU trained in fp32 but dreambooth.json and the checkpoint
    recorded fp16, and the warning that it would not came twice (the trainer's, then the loop's). The same command
    resumes the run."""
    if torch.cuda.is_available():
        pytest.skip("fp16 runs on the GPU")
    out = tmp_path / "db"
    with caplog.at_level("WARNING"):
        assert main(_dreambooth_argv(sd_folder, out, "--mixed-precision", "fp16")) == 0
    assert caplog.text.count("--mixed-precision fp16 needs a GPU") == 1
    assert json.loads((out / "dreambooth.json").read_text())["train"]["mixed_precision"] == "no"
    assert json.loads((out / "checkpoints" / "step-0000001" / "state.json").read_text())["config"]["mixed_precision"] == "no"
    assert main(_dreambooth_argv(sd_folder, out, "--mixed-precision", "fp16", "--max-steps", "2", "--resume")) == 0


def test_dreambooth_trains_at_a_size_the_unet_does_not_halve_exactly(sd_folder, tmp_path):
    """From a review of the size check: sides whose latents the UNet's down blocks do not halve exactly (24 px: 3 x 3
    latents here; 600 px for SD-1.5) train, as in diffusers' script (its UNet passes the skip sizes up); refusing all
    but multiples of 16 (64 for SD-1.5) refused runs that worked."""
    out = tmp_path / "db"
    assert main(_dreambooth_argv(sd_folder, out, "--resolution", "24")) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_dreambooth_text_encoder_targets_without_training_it_are_said_to_be_ignored(sd_folder, tmp_path, caplog):
    """The bug (a review's): --text-encoder-target-modules without --train-text-encoder was ignored without a word,
    where --class-prompt without --with-prior-preservation is named in a warning."""
    with caplog.at_level("WARNING", logger="diffrt.train.dreambooth"):
        assert main(_dreambooth_argv(sd_folder, tmp_path / "db", "--text-encoder-target-modules", "q_proj")) == 0
    assert "--text-encoder-target-modules is ignored without --train-text-encoder" in caplog.text


def test_dreambooth_resume_takes_the_default_class_folder_named(sd_folder, tmp_path, monkeypatch, capsys):
    """The bug (a review's): a run made with the default class folder, OUT/class_images, refused `--resume --class-data
    OUT/class_images` as a changed option (class_data: None saved vs 'r/db/class_images' now)."""
    monkeypatch.chdir(tmp_path)
    prior = ["--with-prior-preservation", "--class-prompt", "a cat", "--num-class-images", "1", "--class-inference-steps", "1"]
    assert main(_dreambooth_argv(sd_folder, Path("r/db"), *prior)) == 0
    assert main(_dreambooth_argv(sd_folder, Path("r/db"), *prior, "--max-steps", "2", "--resume",
                                 "--class-data", "r/db/class_images")) == 0
    assert "trained 1 step (steps 2-2, resumed)" in capsys.readouterr().out


@pytest.mark.parametrize("trainer", ["class-cond", "finetune", "dreambooth-lora"])
def test_each_trainers_python_defaults_are_its_commands(trainer, tmp_path, monkeypatch):
    """The bug (a review's): README says Python takes the CLI's settings, but ClassCondConfig() trained 1000 steps at
    batch 32 where `diffrt train class-cond` trains 2000 at 64, and FinetuneConfig() at batch 32 where the command takes
    16. The config each command builds from its defaults is the trainer's Python default, field for field."""
    import diffrt.train.classcond
    import diffrt.train.dreambooth
    import diffrt.train.finetune

    class Built(Exception):
        pass

    def capture(config):
        raise Built(config)

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    model = tmp_path / "model"
    model.mkdir()
    python, argv = {
        "class-cond": (ClassCondConfig(), ["train", "class-cond"]),
        "finetune": (FinetuneConfig(model=str(model), data="digits"),
                     ["train", "finetune", "--model", str(model), "--data", "digits"]),
        "dreambooth-lora": (DreamBoothConfig(model=str(model), instance_data="chelsea", instance_prompt="a photo of sks cat"),
                            ["train", "dreambooth-lora", "--model", str(model), "--instance-data", "chelsea",
                             "--instance-prompt", "a photo of sks cat"]),
    }[trainer]
    module, function = {"class-cond": (diffrt.train.classcond, "train_class_conditioned"),
                        "finetune": (diffrt.train.finetune, "finetune"),
                        "dreambooth-lora": (diffrt.train.dreambooth, "train_dreambooth_lora")}[trainer]
    monkeypatch.setattr(module, function, capture)
    with pytest.raises(Built) as built:
        main(argv)
    assert built.value.args[0] == python
