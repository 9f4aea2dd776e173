"""`diffrt generate` (issue #5): device resolution, strict mode, what the output line reports, and
one-line errors (exit status 2). In-process through `diffrt.cli.main`, so each test takes seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrt.cli import main
from diffrt.generate import GenerateRequest, generate

LONG_PROMPT = " ".join(f"word{i}" for i in range(60))  # well over the tiny text encoder's 77 tokens


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffrt: error: "), err
    for fragment in fragments:
        assert fragment in err[0]
    return err[0]


def test_class_label_takes_the_class_name_and_numbered_classes_by_their_number(classemb_model_dir, tmp_path, capsys):
    """A model trained on folders cat/dog/... is asked for "cat"; one trained on folders 1, 2, 10, 20 (labels 0..3)
    takes --class-label 10 as the folder "10", its label 2, not as label 10."""
    import json
    import shutil

    from diffrt.generate import class_index

    model = tmp_path / "named"
    shutil.copytree(classemb_model_dir, model)
    info = json.loads((model / "diffrt.json").read_text())
    common = ["--steps", "2", "--seed", "3", "--num-images", "1"]
    for names, given, label in ((["bird", "cat", "dog", "fish"], "cat", 1), (["1", "2", "10", "20"], "10", 2)):
        (model / "diffrt.json").write_text(json.dumps({**info, "class_names": names}))
        assert main(["generate", "--model", str(model), "--class-label", given, *common, "--out", str(tmp_path / "a.png")]) == 0
        assert main(["generate", "--model", str(classemb_model_dir), "--class-label", str(label), *common,
                     "--out", str(tmp_path / "b.png")]) == 0
        assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    capsys.readouterr()
    assert main(["generate", "--model", str(model), "--class-label", "3", *common, "--out", str(tmp_path / "c.png")]) == 2
    one_line_error(capsys, "--class-label '3' is not a class of this model (its classes are 1, 2, 10, 20)")
    assert class_index(3, []) == 3 and class_index(None, ["1"]) is None
    # Zero-padded folders: 1 and 01 are both the class "01" (--class-label 01 was read as the int 1 and refused).
    assert class_index("1", ["00", "01", "10"]) == class_index("01", ["00", "01", "10"]) == 1


def test_class_label_out_of_range_is_one_line(classemb_model_dir, tmp_path, capsys):
    code = main(["generate", "--model", str(classemb_model_dir), "--class-label", "7", "--steps", "1",
                 "--out", str(tmp_path / "x.png")])
    assert code == 2
    one_line_error(capsys, "class label 7 is out of range", "classes 0..3")
    assert not (tmp_path / "x.png").exists()


def test_text_to_image_flags_on_a_pixel_model_are_one_line(uncond_model_dir, tmp_path, capsys):
    """One such flag reads "needs", several "need" (found by trying the README's commands)."""
    image = tmp_path / "photo.png"
    image.write_bytes(b"")
    assert main(["generate", "--model", str(uncond_model_dir), "--image", str(image), "--out", str(tmp_path / "x.png")]) == 2
    one_line_error(capsys, "--image needs a text-to-image model folder", "use --class-label")
    assert main(["generate", "--model", str(uncond_model_dir), "--prompt", "a cat", "--image", str(image),
                 "--out", str(tmp_path / "x.png")]) == 2
    one_line_error(capsys, "--prompt/--image need a text-to-image model folder")
    assert main(["generate", "--model", str(uncond_model_dir), "--clip-skip", "1", "--out", str(tmp_path / "x.png")]) == 2
    one_line_error(capsys, "--clip-skip needs a text-to-image model folder")


def test_class_flags_on_an_unconditional_model_are_refused_not_ignored(uncond_model_dir, tmp_path, capsys):
    """From the CLI review: --class-label 3 and --guidance-scale 5 on an unconditional model gave the very images of a
    call without them (random samples, exit 0); --guidance-scale 1 (no guidance) is what runs, so it passes."""
    out = tmp_path / "x.npy"
    common = ["generate", "--model", str(uncond_model_dir), "--backend", "torch", "--steps", "2", "--out", str(out)]
    assert main([*common, "--class-label", "3"]) == 2
    one_line_error(capsys, "--class-label needs a class-conditioned model", "this one is unconditional: leave --class-label out")
    assert main([*common, "--class-label", "3", "--guidance-scale", "5"]) == 2
    one_line_error(capsys, "--class-label/--guidance-scale need a class-conditioned model")
    assert not out.exists()
    assert main([*common, "--guidance-scale", "1"]) == 0 and out.exists()


def test_clip_skip_reaches_the_pipeline(t2i_folder, tmp_path):
    from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

    out = tmp_path / "x.npy"
    assert main(["generate", "--model", str(t2i_folder), "--prompt", "a cat", "--steps", "2", "--device", "cpu", "--seed", "3",
                 "--clip-skip", "1", "--out", str(out)]) == 0
    pipe = open_text_to_image_pipeline(t2i_folder, "torch", "cpu")
    run = lambda skip: pipe("a cat", num_inference_steps=2, guidance_scale=7.5, seed=3, output_type="np", clip_skip=skip).images  # noqa: E731
    np.testing.assert_allclose(np.load(out), run(1), atol=1e-6)
    assert np.abs(np.load(out) - run(0)).max() > 1e-3


def test_device_defaults_to_auto_and_the_line_names_what_ran(uncond_model_dir, tmp_path, capsys):
    assert GenerateRequest().device is None and GenerateRequest().cuda_graph is True
    out = tmp_path / "x.npy"
    assert main(["generate", "--model", str(uncond_model_dir), "--steps", "1", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {out} (torch, ") and "truncated" not in line
    assert np.load(out).shape == (1, 16, 16, 3)
    result = generate(GenerateRequest(model=str(uncond_model_dir), num_inference_steps=1))
    assert result.images.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_the_cli_shows_a_bar_over_the_steps_and_the_library_does_not(uncond_model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(uncond_model_dir), "--steps", "3", "--out", str(tmp_path / "x.npy")]) == 0
    err = capsys.readouterr().err
    assert "generate: " in err and "/3 [" in err  # the bar, over the 3 steps (cleared when done)
    generate(GenerateRequest(model=str(uncond_model_dir), num_inference_steps=3))
    assert "generate" not in capsys.readouterr().err


def test_tensorrt_with_a_cpu_device_is_one_line_before_any_work(uncond_model_dir, tmp_path, capsys, monkeypatch):
    from diffrt.runtime import backends

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "require_backend", lambda name: None)  # as if TensorRT were installed
    code = main(["generate", "--model", str(uncond_model_dir), "--backend", "tensorrt", "--device", "cpu",
                 "--out", str(tmp_path / "x.png")])
    assert code == 2
    one_line_error(capsys, "backend 'tensorrt' runs on a CUDA device, not cpu")


def test_strict_refuses_an_artifact_on_the_torch_backend(uncond_model_dir, tmp_path, capsys):
    from diffrt.export.artifact import export_pixel_model
    from diffrt.export.options import ExportOptions

    artifact = export_pixel_model(uncond_model_dir, tmp_path / "art", ExportOptions(batch=(1, 2, 8), verify=False)).folder
    args = ["generate", "--model", str(artifact), "--steps", "1", "--out", str(tmp_path / "x.npy")]
    assert main([*args, "--backend", "torch", "--strict"]) == 2
    one_line_error(capsys, "strict mode refuses")
    assert main([*args, "--backend", "torch"]) == 0  # without --strict: a warning, and the source weights run
    assert main([*args, "--backend", "onnxruntime", "--strict"]) == 0
    assert "(onnxruntime on CPUExecutionProvider, " in capsys.readouterr().out
    assert main([*args, "--strict"]) == 0  # no --backend: an artifact runs its exported files
    assert "(onnxruntime on CPUExecutionProvider, " in capsys.readouterr().out


def test_a_truncated_prompt_is_a_warning_and_on_the_output_line(t2i_folder, tmp_path, capsys):
    out = tmp_path / "x.npy"
    assert main(["generate", "--model", str(t2i_folder), "--prompt", LONG_PROMPT, "--steps", "1", "--device", "cpu",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().endswith("(prompt truncated)")
    warnings = [line for line in captured.err.splitlines() if line.startswith("diffrt: warning: ")]
    assert len(warnings) == 1 and "77 tokens" in warnings[0] and "word59" in warnings[0].replace(" ", "")


# --- several ControlNets: repeatable --controlnet / --control-image / --control-scale ------------------


@pytest.fixture()
def control_pngs(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(4)
    paths = [tmp_path / f"control{i}.png" for i in range(2)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return [str(p) for p in paths]


def test_generate_with_two_controlnets_equals_the_pipeline(t2i_folder, t2i_controlnet_b, control_pngs, tmp_path, capsys):
    from diffrt.images import load_image
    from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

    nets = [str(t2i_folder / "controlnet"), str(t2i_controlnet_b)]
    out = tmp_path / "x.npy"
    args = ["generate", "--model", str(t2i_folder), "--prompt", "a cat", "--steps", "2", "--device", "cpu", "--seed", "3",
            "--controlnet", nets[0], "--controlnet", nets[1], "--control-image", control_pngs[0], "--control-image", control_pngs[1]]
    assert main([*args, "--control-scale", "0.5", "--control-scale", "1.5", "--out", str(out)]) == 0
    pipe = open_text_to_image_pipeline(t2i_folder, "torch", "cpu", controlnet=nets)
    expected = pipe("a cat", num_inference_steps=2, guidance_scale=7.5, seed=3, output_type="np",
                    control_image=[load_image(p) for p in control_pngs], controlnet_conditioning_scale=[0.5, 1.5]).images
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6)
    # One --control-scale applies to every ControlNet.
    assert main([*args, "--control-scale", "0.8", "--out", str(tmp_path / "one.npy")]) == 0
    expected = pipe("a cat", num_inference_steps=2, guidance_scale=7.5, seed=3, output_type="np",
                    control_image=[load_image(p) for p in control_pngs], controlnet_conditioning_scale=0.8).images
    np.testing.assert_allclose(np.load(tmp_path / "one.npy"), expected, atol=1e-6)
    # --control-guidance-start/end: one per ControlNet, or one for all.
    window = ["--control-guidance-start", "0.5", "--control-guidance-start", "0", "--control-guidance-end", "0.9"]
    assert main([*args, "--steps", "4", *window, "--out", str(tmp_path / "window.npy")]) == 0
    expected = pipe("a cat", num_inference_steps=4, guidance_scale=7.5, seed=3, output_type="np",
                    control_image=[load_image(p) for p in control_pngs], control_guidance_start=[0.5, 0.0], control_guidance_end=0.9)
    np.testing.assert_allclose(np.load(tmp_path / "window.npy"), expected.images, atol=1e-6)
    assert main([*args, "--control-scale", "0.8", "--guess-mode", "--out", str(tmp_path / "guess.npy")]) == 0
    expected = pipe("a cat", num_inference_steps=2, guidance_scale=7.5, seed=3, output_type="np",
                    control_image=[load_image(p) for p in control_pngs], controlnet_conditioning_scale=0.8, guess_mode=True).images
    np.testing.assert_allclose(np.load(tmp_path / "guess.npy"), expected, atol=1e-6)
    assert np.abs(np.load(tmp_path / "guess.npy") - np.load(tmp_path / "one.npy")).max() > 1e-3


def test_controlnet_count_mismatches_are_one_line(t2i_folder, t2i_controlnet_b, t2i_multi_artifact, control_pngs, tmp_path, capsys):
    nets = ["--controlnet", str(t2i_folder / "controlnet"), "--controlnet", str(t2i_controlnet_b)]
    common = ["generate", "--prompt", "a cat", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "x.npy")]
    folder = ["--model", str(t2i_folder)]
    cases = [
        ([*folder, *nets, "--control-image", control_pngs[0]], ("got 2 --controlnet but 1 --control-image",)),
        ([*folder, *nets], ("--controlnet DIR needs --control-image FILE",)),
        ([*folder, *nets, "--control-image", control_pngs[0], "--control-image", control_pngs[1],
          "--control-scale", "1", "--control-scale", "1", "--control-scale", "1"], ("got 3 --control-scale for 2 --control-image",)),
        (["--model", str(t2i_multi_artifact), "--backend", "onnxruntime", "--control-image", control_pngs[0]],
         ("runs 2 ControlNets", "got 1")),
        (["--model", str(t2i_multi_artifact), "--backend", "onnxruntime", *nets[:2], "--control-image", control_pngs[0]],
         ("exported with 2 ControlNets", "not 1 ControlNet")),
    ]
    for args, fragments in cases:
        assert main([*common, *args]) == 2, args
        one_line_error(capsys, *fragments)
    assert not (tmp_path / "x.npy").exists()


def test_export_takes_repeated_controlnets_in_order(t2i_folder, t2i_controlnet_b, t2i_multi_artifact, capsys):
    # The session's two-ControlNet artifact was exported with these options: the CLI's export is a cache hit.
    assert main(["export", "--model", str(t2i_folder), "--out", str(t2i_multi_artifact), "--batch", "1:2:4",
                 "--height", "32:32:64", "--width", "32:32:64", "--controlnet", str(t2i_folder / "controlnet"),
                 "--controlnet", str(t2i_controlnet_b)]) == 0
    assert "cache hit" in capsys.readouterr().out


def test_one_image_is_written_as_itself_several_as_a_grid(classemb_model_dir, tmp_path):
    from PIL import Image

    from diffrt.images import png_bytes

    common = ["generate", "--model", str(classemb_model_dir), "--class-label", "1", "--steps", "2", "--seed", "3"]
    assert main([*common, "--num-images", "1", "--out", str(tmp_path / "one.png")]) == 0
    image = generate(GenerateRequest(model=str(classemb_model_dir), class_label=1, num_images=1, num_inference_steps=2, seed=3,
                                     device="cpu")).images[0]
    assert (tmp_path / "one.png").read_bytes() == png_bytes(image)  # the image, at its own size, no border
    assert main([*common, "--num-images", "4", "--out", str(tmp_path / "four.png")]) == 0
    grid = Image.open(tmp_path / "four.png")
    assert grid.width > 4 * image.shape[-1]  # four images side by side, scaled and bordered


def test_an_artifact_runs_on_what_it_was_exported_for_by_default(uncond_model_dir, tmp_path, monkeypatch):
    """No --backend: an ONNX-only artifact runs on ONNX Runtime even where TensorRT is installed
    (it has no engines to run); engines run on TensorRT where it runs."""
    from diffrt.export.artifact import export_pixel_model
    from diffrt.export.options import ExportOptions
    from diffrt.export import manifest as mf
    from diffrt.runtime import backends
    from diffrt.runtime.loading import artifact_backend

    artifact = export_pixel_model(uncond_model_dir, tmp_path / "art", ExportOptions(batch=(1, 2, 8), verify=False)).folder
    monkeypatch.setattr(backends, "backend_available", lambda name: True)  # as if TensorRT were installed
    assert artifact_backend(artifact) == "onnxruntime"
    manifest = mf.read_manifest(artifact)
    manifest["components"]["unet"]["engine"] = {"tensorrt": "10.3.0"}
    mf.write_manifest(artifact, manifest)
    assert artifact_backend(artifact) == "tensorrt"
    monkeypatch.setattr(backends, "backend_available", lambda name: name != "tensorrt")
    assert artifact_backend(artifact) == "onnxruntime"



def test_engines_that_cannot_run_here_are_a_fallback_said_and_refused_when_strict(uncond_model_dir, tmp_path, caplog):
    """From a review: an artifact with TensorRT engines, opened with no backend named where TensorRT does not run (a
    GPU server whose TensorRT broke, a CPU machine), ran its ONNX files on ONNX Runtime without a word, under --strict
    too, which promises that any fallback is an error."""
    import logging

    from diffrt.errors import BackendUnavailableError
    from diffrt.export import manifest as mf
    from diffrt.export.artifact import export_pixel_model
    from diffrt.export.options import ExportOptions
    from diffrt.runtime.backends import backend_available
    from diffrt.runtime.opening import open_pipeline

    if backend_available("tensorrt"):
        pytest.skip("TensorRT runs here: the engines would run")
    artifact = export_pixel_model(uncond_model_dir, tmp_path / "art", ExportOptions(batch=(1, 2, 8), verify=False)).folder
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        assert open_pipeline(artifact, strict=True).backend == "onnxruntime"  # no engines: nothing falls back
    assert "TensorRT" not in caplog.text
    manifest = mf.read_manifest(artifact)  # as a TensorRT export made on a GPU machine records its engine
    (artifact / "unet" / "engine.plan").write_bytes(b"an engine built on another machine")
    manifest["components"]["unet"]["engine"] = {"tensorrt": "10.3.0"}
    manifest["components"]["unet"]["files"].update(mf.hash_files(artifact, ["unet/engine.plan"]))
    mf.write_manifest(artifact, manifest)
    with pytest.raises(BackendUnavailableError, match=r"holds TensorRT engines, which cannot run here \(.+\); strict mode refuses"):
        open_pipeline(artifact, strict=True)
    assert main(["generate", "--model", str(artifact), "--steps", "1", "--strict", "--out", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        assert open_pipeline(artifact).backend == "onnxruntime"
    assert "holds TensorRT engines, which cannot run here" in caplog.text and "running its ONNX files on ONNX Runtime" in caplog.text


def test_one_default_backend_rule_for_every_entry_point(uncond_model_dir, tmp_path):
    """A review found `diffrt demo --ui --model FOLDER` exporting a diffusers folder where `diffrt generate` and
    open_pipeline ran it in PyTorch, each entry point with its own rule. One rule now: an artifact runs its own
    files; a diffusers folder runs in PyTorch, except in the demos (exported=True), which show the exported runtime."""
    from diffrt.export.artifact import export_pixel_model
    from diffrt.export.options import ExportOptions
    from diffrt.runtime.backends import best_exported_backend
    from diffrt.runtime.loading import default_backend
    from diffrt.runtime.opening import open_pipeline

    artifact = export_pixel_model(uncond_model_dir, tmp_path / "art", ExportOptions(batch=(1, 2, 8), verify=False)).folder
    assert default_backend(artifact) == default_backend(artifact, exported=True) == "onnxruntime"
    assert default_backend(uncond_model_dir) == default_backend(None) == "torch"
    assert default_backend(uncond_model_dir, exported=True) == best_exported_backend()
    assert open_pipeline(uncond_model_dir).backend == "torch" and open_pipeline(artifact).backend == "onnxruntime"


def test_controlnet_img2img_takes_diffusers_default_scale(t2i_folder, control_pngs, tmp_path):
    """Without --control-scale, `--image` with a ControlNet runs at 0.8, the default of diffusers'
    StableDiffusionControlNetImg2ImgPipeline (1.0 is StableDiffusionControlNetPipeline's)."""
    from diffrt.images import load_image
    from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

    net = str(t2i_folder / "controlnet")
    out = tmp_path / "x.npy"
    assert main(["generate", "--model", str(t2i_folder), "--prompt", "a cat", "--steps", "3", "--device", "cpu", "--seed", "2",
                 "--controlnet", net, "--control-image", control_pngs[0], "--image", control_pngs[1], "--strength", "0.7",
                 "--out", str(out)]) == 0
    pipe = open_text_to_image_pipeline(t2i_folder, "torch", "cpu", controlnet=net)
    run = lambda scale: pipe("a cat", num_inference_steps=3, guidance_scale=7.5, seed=2, output_type="np", strength=0.7,  # noqa: E731
                             image=load_image(control_pngs[1]), control_image=load_image(control_pngs[0]),
                             controlnet_conditioning_scale=scale).images
    np.testing.assert_allclose(np.load(out), run(0.8), atol=1e-6)
    assert np.abs(np.load(out) - run(1.0)).max() > 1e-3  # the test can tell the two defaults apart


def test_one_image_whose_deepest_level_is_one_pixel_is_refused_in_one_line(t2i_folder, tmp_path, capsys):
    """The bug (a review's): the tiny UNet (32 channels in 32 groups at its deepest level, as diffusers' test models)
    passed 16 px, its smallest multiple, then raised torch's "Expected more than 1 value per channel" from inside the
    model for one image alone (guidance scale 1): a traceback from generate, and from export's parity run at its
    smallest shape after writing half an artifact; a 500 from serve. Two images at once (CFG's pair), or a side
    above 16, run: a first fix that refused every 16 px side refused those too (a second review's)."""
    from diffrt.bench.sd15 import UNET as SD15_UNET
    from diffrt.models import smallest_deepest_side
    from diffrt.text_to_image_models import load_text_to_image

    assert load_text_to_image(t2i_folder, weights=False).one_value_side == 16
    assert smallest_deepest_side(SD15_UNET) == 1  # 1280 channels in 32 groups: a 64 px image alone (latents 8) runs
    out = tmp_path / "x.npy"
    common = ["generate", "--model", str(t2i_folder), "--prompt", "a cat", "--steps", "1", "--device", "cpu", "--out", str(out)]
    assert main([*common, "--guidance-scale", "1", "--height", "16", "--width", "16"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors == [errors[0]] and errors[0].startswith("diffrt: error: one 16x16 image leaves the UNet's deepest level "
                                                          "one pixel"), errors  # after transformers' loading bar
    assert not out.exists()
    assert main([*common, "--height", "16", "--width", "16"]) == 0  # CFG: two images at once
    assert np.load(out).shape == (1, 16, 16, 3)
    assert main([*common, "--guidance-scale", "1", "--height", "16", "--width", "32"]) == 0
    assert main(["export", "--model", str(t2i_folder), "--out", str(tmp_path / "art"), "--height", "16:32:32"]) == 2
    assert "the smallest shape these ranges give the unet, one 16x16 image" in capsys.readouterr().err
    assert not (tmp_path / "art").exists()


def test_strength_without_an_image_is_refused_in_one_line(t2i_folder, tmp_path, capsys):
    """The bug: --strength without --image ran text-to-image, the flag ignored without a word (its default, 0.8,
    could not be told from a value given), where `diffrt serve` refuses the same request."""
    out = tmp_path / "x.png"
    assert main(["generate", "--model", str(t2i_folder), "--prompt", "a cat", "--steps", "2", "--device", "cpu",
                 "--strength", "0.5", "--out", str(out)]) == 2
    one_line_error(capsys, "--strength 0.5 sets how much of an --image is redrawn", "pass --image FILE")
    assert not out.exists()


@pytest.mark.parametrize("flags, fragments", [
    (["--color-scale", "9"], ("--color-scale 9 sets the strength of color guidance, and none is asked", "give --color HEX")),
    (["--clip-scale", "50"], ("--clip-scale 50 sets the strength of clip guidance", "give --clip-prompt TEXT")),
    (["--clip-model", "clipdir"], ("--clip-model clipdir is the model CLIP guidance scores with", "give --clip-prompt TEXT")),
    (["--guidance-mode", "through_unet"], ("--guidance-mode through_unet sets how gradient guidance runs, and none is asked",)),
    (["--color", ""], ("colour '' is not a hex colour",)),
    (["--clip-prompt", "", "--clip-model", "clipdir"], ("CLIP guidance needs a non-empty prompt",)),
], ids=["color-scale", "clip-scale", "clip-model", "guidance-mode", "empty-color", "empty-clip-prompt"])
def test_a_guidance_flag_that_would_do_nothing_is_refused_in_one_line(classemb_model_dir, tmp_path, capsys, flags, fragments):
    """From the guidance review: each of these gave unguided images without a word (a scale without its target, a
    CLIP model without a prompt, a mode with no guidance, an empty target), where --strength without --image is refused."""
    out = tmp_path / "x.png"
    assert main(["generate", "--model", str(classemb_model_dir), "--class-label", "1", "--steps", "2", "--device", "cpu",
                 *flags, "--out", str(out)]) == 2
    one_line_error(capsys, *fragments)
    assert not out.exists()
    # The defaults stand when the target is given: the help and GenerateRequest say the same.
    assert main(["generate", "--model", str(classemb_model_dir), "--class-label", "1", "--steps", "2", "--device", "cpu",
                 "--color", "#ff0000", "--out", str(out)]) == 0
    assert f"(default: {GenerateRequest.color_scale})" in " ".join(build_parser_help("generate").split())
    assert f"(default: {GenerateRequest.clip_scale})" in " ".join(build_parser_help("generate").split())


def build_parser_help(command: str) -> str:
    from diffrt.cli import build_parser

    parser = build_parser()
    return next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == command)[1].format_help()


@pytest.mark.parametrize("sizes", [[], ["--height", "48", "--width", "48"], ["--height", "48"]])
def test_an_image_file_is_resized_as_the_api_and_diffusers_resize_it_opened_with_pil(t2i_folder, tmp_path, sizes):
    """The bug: generate resized --image/--control-image files with bicubic (with --height and --width) or
    handed the pipeline a tensor of the file's own size, which it resized with nearest (no size, one side, or
    a size off the VAE's multiple), so a file gave other images than `pipe(image=Image.open(file))` and
    StableDiffusionImg2ImgPipeline, which resize PIL images with Lanczos."""
    from PIL import Image

    from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

    path = tmp_path / "photo.png"
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(path)  # 36 x 44: not multiples of 8
    out = tmp_path / "x.npy"
    assert main(["generate", "--model", str(t2i_folder), "--prompt", "a cat", "--steps", "3", "--device", "cpu", "--seed", "2",
                 "--image", str(path), "--strength", "0.7", *sizes, "--out", str(out)]) == 0
    given = dict(zip(sizes[::2], map(int, sizes[1::2])))
    pipe = open_text_to_image_pipeline(t2i_folder, "torch", "cpu")
    expected = pipe("a cat", num_inference_steps=3, guidance_scale=7.5, seed=2, output_type="np", strength=0.7,
                    image=Image.open(path), height=given.get("--height"), width=given.get("--width")).images
    assert np.load(out).shape == expected.shape
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)


def test_the_output_line_says_what_guidance_ran_in_pytorch(classemb_model_dir, tmp_path, capsys):
    """An exported backend with gradient guidance runs parts in PyTorch (engines have no autograd): the line
    said only 'onnxruntime' (RELIABILITY #15)."""
    from diffrt.export.artifact import export_pixel_model
    from diffrt.export.options import ExportOptions

    artifact = export_pixel_model(classemb_model_dir, tmp_path / "art", ExportOptions(batch=(1, 2, 8), verify=False)).folder
    out = tmp_path / "x.png"
    common = ["generate", "--model", str(artifact), "--backend", "onnxruntime", "--steps", "2", "--class-label", "1",
              "--out", str(out), "--color", "#ff0000", "--color-scale", "5"]
    for mode, ran in (("x0", None), ("through_unet", "guidance ran the unet in PyTorch")):
        capsys.readouterr()
        assert main([*common, "--guidance-mode", mode]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert line.startswith(f"wrote {out} (onnxruntime") and ((ran in line) if ran else "PyTorch" not in line), line


def test_a_size_outside_an_export_generate_made_says_how_to_export_a_range(uncond_model_dir, tmp_path, capsys):
    """generate exports a model folder itself for an exported backend, at the model's own size; a size outside it said
    "re-export with a wider --height range", a flag generate does not take. An artifact's refusal keeps that advice."""
    common = ["--steps", "1", "--height", "32", "--out", str(tmp_path / "x.npy")]
    assert main(["generate", "--model", str(uncond_model_dir), "--backend", "onnxruntime", *common]) == 2
    one_line_error(capsys, "height 32 is outside the built range [16, 16], that of the onnxruntime export made for this call",
                   f"`diffrt export --model {uncond_model_dir} --height MIN:OPT:MAX --out DIR` and generate with --model DIR")
    assert main(["export", "--model", str(uncond_model_dir), "--out", str(tmp_path / "artifact"), "--no-verify"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "artifact"), *common]) == 2
    one_line_error(capsys, "height 32 is outside the built range [16, 16]; re-export with a wider --height range")


def test_an_image_to_image_request_is_checked_before_the_model_loads(t2i_folder, tmp_path, capsys, monkeypatch):
    """A strength outside [0, 1] or an --image that is not there was found after the text-to-image model loaded."""
    from PIL import Image

    from diffrt.runtime import text_to_image_loading

    monkeypatch.setattr(text_to_image_loading, "open_text_to_image_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    common = ["generate", "--model", str(t2i_folder), "--prompt", "a cat", "--out", str(tmp_path / "o.png")]
    assert main([*common, "--image", str(tmp_path / "x.png"), "--strength", "1.5"]) == 2
    one_line_error(capsys, "strength must be in [0, 1], got 1.5")
    assert main([*common, "--image", str(tmp_path / "missing.png")]) == 2
    one_line_error(capsys, "missing.png: no such file")
