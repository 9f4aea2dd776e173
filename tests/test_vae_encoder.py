"""The VAE encoder as a component of its own (`diffrt export --vae-encoder`): its graph equals diffusers'
posterior parameters across the declared ranges, image-to-image over an artifact that has it runs it on the
backend and equals PyTorch, one without it encodes in PyTorch and says so (RELIABILITY #15), and the option
keeps the VAE in fp32 where the model asks (RELIABILITY #5) and leaves no folder behind when dropped."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import T2I_RANGES, max_abs
from diffrt.errors import BackendUnavailableError, DiffrtError
from diffrt.export.artifact import export_model
from diffrt.export.options import ExportOptions
from diffrt.export.manifest import read_manifest
from diffrt.export.text_to_image import export_text_to_image
from diffrt.export.verify import compare
from diffrt.generate import result_summary
from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline
from diffrt.text_to_image_models import load_text_to_image

CPU = "cpu"
ORT_TOL = 1e-3  # images in [0, 1], fp32 ONNX Runtime vs eager PyTorch, whole sampling runs
GRAPH_TOL = 1e-4  # one graph: max |onnx - torch| / max |torch|


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def plain_artifact(t2i_folder, tmp_path_factory):
    """t2i_folder exported without a ControlNet and without the VAE encoder."""
    out = tmp_path_factory.mktemp("no_encoder") / "artifact"
    export_text_to_image(t2i_folder, out, ExportOptions(**T2I_RANGES), [])
    return out


def img2img(pipe, **kwargs):
    kwargs = {"strength": 0.7, "num_inference_steps": 3, "guidance_scale": 3.0, "output_type": "pt", **kwargs}
    return pipe("a red cube", **kwargs)


def test_the_encoder_graph_equals_diffusers_posterior_parameters(t2i_artifact, t2i_folder):
    """What AutoencoderKL.encode's latent_dist holds (mean and log-variance, before any draw), at sizes across the ranges."""
    pipe = open_text_to_image_pipeline(t2i_artifact, "onnxruntime", CPU)
    vae = load_text_to_image(t2i_folder).vae
    assert pipe.vae_encoder.name == "onnxruntime"
    for seed, (batch, height, width) in enumerate([(1, 32, 32), (3, 64, 32), (2, 48, 64)]):
        x = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        with torch.no_grad():
            expected = vae.encode(x).latent_dist.parameters
        got = pipe.vae_encoder.run({"image": x})["latent_parameters"]
        assert got.shape == expected.shape == (batch, 8, height // 8, width // 8)
        assert compare(expected, got).max_rel <= GRAPH_TOL, (batch, height, width)


@pytest.mark.parametrize("per_image", [False, True], ids=["one-generator", "generator-per-image"])
def test_img2img_over_the_artifact_encodes_on_the_backend_and_equals_torch(t2i_artifact, t2i_folder, image, per_image):
    """The posterior is drawn from the call's generators after the backend's encoder: the same images as
    eager PyTorch (whose own img2img equals diffusers', test_text_to_image), with one generator or one per image."""
    artifact = open_text_to_image_pipeline(t2i_artifact, "onnxruntime", CPU)
    eager = open_text_to_image_pipeline(t2i_folder, "torch", CPU, controlnet=t2i_folder / "controlnet")

    def generator():
        return [torch.Generator().manual_seed(s) for s in (3, 4)] if per_image else torch.Generator().manual_seed(3)

    result = img2img(artifact, image=image, num_images_per_prompt=2, generator=generator())
    expected = img2img(eager, image=image, num_images_per_prompt=2, generator=generator())
    assert result.metadata["components"]["vae_encoder"] == "onnxruntime"
    assert result.metadata["providers"]["vae_encoder"] == ["CPUExecutionProvider"]
    assert "vae_encoder" not in artifact("a red cube", num_inference_steps=1).metadata["components"]  # what each call ran
    assert "vae_decoder" not in artifact("a red cube", num_inference_steps=1, output_type="latent").metadata["components"]
    ids = artifact.tokenizer(["a red cube"], padding="max_length", max_length=artifact.max_length, return_tensors="pt").input_ids
    embeds = artifact.text_encoder.run({"input_ids": ids, "clip_skip": torch.tensor([0])})["last_hidden_state"]
    ran = artifact(prompt_embeds=embeds, negative_prompt_embeds=embeds, num_inference_steps=1).metadata["components"]
    assert "text_encoder" not in ran and "unet_controlnet" in ran
    assert max_abs(result.images, expected.images) <= ORT_TOL
    if per_image:  # each image sampled its own posterior row: the two differ though the init image is one
        assert max_abs(result.images[0], result.images[1]) > 1e-3


def test_an_artifact_without_the_encoder_encodes_in_pytorch_and_says_so(plain_artifact, t2i_folder, image):
    pipe = open_text_to_image_pipeline(plain_artifact, "onnxruntime", CPU)
    assert "vae_encoder" not in pipe.backends()
    assert "vae_encoder" not in pipe("a red cube", num_inference_steps=2).metadata["components"]  # text-to-image: no encoder ran
    result = img2img(pipe, image=image, seed=5)
    assert result.metadata["components"]["vae_encoder"] == "torch"  # the fallback is reported, never silent
    assert max_abs(result.images, img2img(open_text_to_image_pipeline(t2i_folder, "torch", CPU), image=image, seed=5).images) <= ORT_TOL
    assert "vae_encoder" not in pipe("a red cube", num_inference_steps=2).metadata["components"]  # only calls that encoded say so
    assert "the vae_encoder ran in PyTorch" in result_summary(result, Path("x.png"))  # `diffrt generate`'s line too

    strict = open_text_to_image_pipeline(plain_artifact, "onnxruntime", CPU, strict=True)
    assert strict("a red cube", num_inference_steps=1).backend == "onnxruntime"
    with pytest.raises(BackendUnavailableError, match="fallback strict mode refuses: re-export with --vae-encoder"):
        img2img(strict, image=image, seed=5)


def test_a_fallbacks_first_load_is_not_counted_in_the_calls_time(plain_artifact, image):
    """The bug (a review's): the first image-to-image call over an artifact without the encoder loaded the source's
    PyTorch VAE inside its timing, and `diffrt generate`, which makes one call, printed ~600 ms/step for ~13."""
    import time

    pipe = open_text_to_image_pipeline(plain_artifact, "onnxruntime", CPU)
    start = time.perf_counter()
    first = img2img(pipe, image=image, seed=5)
    wall = time.perf_counter() - start
    loaded = first.metadata["load_seconds"]
    assert loaded > 0 and first.seconds <= wall - loaded
    assert img2img(pipe, image=image, seed=5).metadata["load_seconds"] == 0  # loaded once


@pytest.mark.parametrize("strict", [False, True])
def test_a_service_over_an_artifact_without_the_encoder_says_what_encodes(plain_artifact, image, strict):
    """The PyTorch fallback is made when the service loads: described and timed as the other components; under
    --strict, image-to-image requests are refused (422) by name, and the service says it takes none."""
    import base64

    httpx = pytest.importorskip("httpx")
    from diffrt.images import png_bytes
    from diffrt.serve.app import BackgroundServer, ServeConfig

    config = ServeConfig(model=str(plain_artifact), backend="onnxruntime", port=0, api_key_env=None, device="cpu", warmup_steps=1,
                         log_level="warning", strict=strict)
    body = {"prompt": "a red cube", "num_inference_steps": 3, "seed": 1, "strength": 0.7,
            "image": base64.b64encode(png_bytes(image[0])).decode("ascii")}
    with BackgroundServer(config) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        ready = client.get("/readyz").json()
        r = client.post("/v1/generate", json=body, headers={"Accept": "application/json"})
        metrics = client.get("/metrics").text
    assert ready["image_to_image"] is not strict
    # The fallback is a metric as well as a description (RELIABILITY #15): the gauge counts components on PyTorch.
    fallbacks = re.search(r"^diffrt_serve_torch_fallbacks (\S+)$", metrics, re.M)
    assert fallbacks is not None and float(fallbacks.group(1)) == (0 if strict else 1)
    if strict:
        assert r.status_code == 422 and "re-export with --vae-encoder" in r.text and "vae_encoder" not in ready["components"]
    else:
        assert r.status_code == 200, r.text
        assert ready["components"]["vae_encoder"] == "torch" and r.json()["timings_ms"]["vae_encoder"] > 0


def test_automatic_exports_made_before_the_encoder_option_keep_their_folders():
    """An automatic export's folder is named by its settings' text: the option, left at its default, adds nothing
    to it, so the folders of exports made before it (the digits model's for `diffrt demo`) are still found."""
    from diffrt.export.options import options_text

    assert options_text(ExportOptions()) == (
        "ExportOptions(backend='onnx', precision='fp32', batch=(1, 8, 64), height=None, width=None, opset=17, "
        "exporter='torchscript', loras=[], verify=True, external_data_threshold=2147483648)")
    assert "vae_encoder=True" in options_text(ExportOptions(vae_encoder=True))


def test_cli_export_with_the_encoder_keeps_it_fp32_where_the_vae_asks_and_a_rebuild_without_drops_it(t2i_folder, tmp_path, capsys):
    from diffrt.cli import main

    out = tmp_path / "fp16"
    assert main(["export", "--model", str(t2i_folder), "--out", str(out), "--precision", "fp16", "--vae-encoder",
                 "--batch", "1:2:4", "--height", "32", "--width", "32"]) == 0
    assert "vae_encoder" in capsys.readouterr().out
    components = read_manifest(out)["components"]
    assert components["vae_encoder"]["precision"] == "fp32"  # the tiny VAE asks for force_upcast, as SD-1.5's
    assert components["unet"]["precision"] == "fp16" and components["vae_encoder"]["parity"]["onnxruntime"]["passed"]

    export_text_to_image(t2i_folder, out, ExportOptions(precision="fp16", batch=(1, 2, 4), height=(32, 32, 32), width=(32, 32, 32)), [])
    assert "vae_encoder" not in read_manifest(out)["components"] and not (out / "vae_encoder").exists()


def test_a_pixel_model_has_no_vae_to_export(tmp_path):
    with pytest.raises(DiffrtError, match="pixel-space model, which has no VAE"):
        export_model(None, tmp_path / "digits", ExportOptions(vae_encoder=True))


def test_an_automatic_export_includes_the_encoder(t2i_folder, tmp_path, monkeypatch):
    """`diffrt generate --backend onnxruntime` over a diffusers folder exports into the user cache: with the encoder,
    so its image-to-image runs on ONNX Runtime as well."""
    monkeypatch.setenv("DIFFRT_CACHE_DIR", str(tmp_path / "cache"))
    pipe = open_text_to_image_pipeline(t2i_folder, "onnxruntime", CPU)
    assert pipe.vae_encoder is not None and pipe.vae_encoder.name == "onnxruntime"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_tensorrt_artifact_runs_text_to_image_and_img2img_on_its_engines_as_pytorch(t2i_folder, image, tmp_path, no_tf32):
    """End to end on engines (text encoder, UNet, VAE decoder and encoder), fp32: the images equal eager
    PyTorch's on the same GPU (TF32 off), for text-to-image and image-to-image."""
    from diffrt.runtime.backends import backend_available

    if not backend_available("tensorrt"):
        pytest.skip("needs TensorRT")
    out = tmp_path / "trt"
    export_text_to_image(t2i_folder, out, ExportOptions(backend="tensorrt", vae_encoder=True, **T2I_RANGES), [])
    engines = open_text_to_image_pipeline(out, "tensorrt", "cuda")
    eager = open_text_to_image_pipeline(t2i_folder, "torch", "cuda")
    for kwargs in (dict(), dict(image=image, strength=0.6)):
        result = img2img(engines, seed=4, **kwargs) if kwargs else engines("a red cube", seed=4, num_inference_steps=3, output_type="pt")
        expected = img2img(eager, seed=4, **kwargs) if kwargs else eager("a red cube", seed=4, num_inference_steps=3, output_type="pt")
        assert set(result.metadata["components"].values()) == {"tensorrt"}
        assert max_abs(result.images.cpu(), expected.images.cpu()) <= ORT_TOL
