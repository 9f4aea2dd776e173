"""Changing the strength of a running pipeline's LoRA (`set_lora_scale`, diffusers' `lora_scale`).

diffusers is the oracle: `load_lora_weights` then `cross_attention_kwargs={"scale": s}` (unfused
adapters at s times their weight). Within diffrt, scale s must give bit for bit what opening the
pipeline with the LoRA at s times its scale gives, and going back and forth never accumulates.
The TensorRT refit path (EngineLora) needs a GPU and TensorRT: tests/test_tensorrt.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from diffrt.errors import DiffrtError
from diffrt.generate import DEFAULT_PIXEL_GUIDANCE_SCALE
from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

CPU = "cpu"
STEPS = 3


@pytest.fixture(scope="module")
def lora(t2i_folder, tmp_path_factory):
    from diffrt.tiny import tiny_lora_files

    return tiny_lora_files(t2i_folder, tmp_path_factory.mktemp("lora"), seed=11)["peft"]


@pytest.fixture(scope="module")
def lora_pipe(t2i_folder, lora):
    return open_text_to_image_pipeline(t2i_folder, "torch", CPU, loras=[(lora, 0.8)])


def run(pipe, seed=3, **kwargs):
    return pipe("a photo of the cat", num_inference_steps=STEPS, guidance_scale=5.0, seed=seed, output_type="pt", **kwargs).images


def weights(pipe) -> dict[str, torch.Tensor]:
    modules = {"unet": pipe.unet.module, "text_encoder": pipe.text_encoder.module}
    return {f"{c}.{k}": v.clone() for c, m in modules.items() for k, v in m.state_dict().items()}


def test_scale_equals_opening_at_that_scale(t2i_folder, lora, lora_pipe):
    opened = run(lora_pipe)
    lora_pipe.set_lora_scale(0.5)
    try:
        assert lora_pipe.lora_scale == 0.5
        at_half = run(lora_pipe)
        assert torch.equal(at_half, run(open_text_to_image_pipeline(t2i_folder, "torch", CPU, loras=[(lora, 0.4)])))
        assert (at_half - opened).abs().max() > 1e-3  # the LoRA's strength shows in the images
        lora_pipe.set_lora_scale(0.0)
        assert torch.equal(run(lora_pipe), run(open_text_to_image_pipeline(t2i_folder, "torch", CPU)))  # 0: the base model
    finally:
        lora_pipe.set_lora_scale(1.0)
    assert torch.equal(run(lora_pipe), opened)


def test_a_scale_change_waits_for_the_calls_running_and_new_calls_wait_for_it(lora_pipe):
    """The bug: set_lora_scale re-fused the weights under a call running in another thread, whose image was then
    made at neither scale and whose metadata named the new one."""
    import threading

    opened, at_zero = run(lora_pipe), None
    lora_pipe.set_lora_scale(0.0)
    try:
        at_zero = run(lora_pipe)
    finally:
        lora_pipe.set_lora_scale(1.0)
    started, release, changed = threading.Event(), threading.Event(), threading.Event()
    results = {}

    def progress(i):
        if i == 0:
            started.set()
            assert release.wait(30)

    def call():
        results["running"] = lora_pipe("a photo of the cat", num_inference_steps=STEPS, guidance_scale=5.0, seed=3,
                                       output_type="pt", progress=progress)

    def change():
        lora_pipe.set_lora_scale(0.0)
        changed.set()

    caller = threading.Thread(target=call)
    caller.start()
    assert started.wait(30)
    changer = threading.Thread(target=change)
    changer.start()
    assert not changed.wait(0.5)  # held while the call runs
    late = threading.Thread(target=lambda: results.setdefault("late", run(lora_pipe)))
    late.start()  # a call made while the change waits runs after it, at the new scale
    release.set()
    for thread in (caller, changer, late):
        thread.join(60)
    try:
        assert changed.is_set()
        assert torch.equal(results["running"].images, opened) and results["running"].metadata["lora_scale"] == 1.0
        assert torch.equal(results["late"], at_zero)
        with pytest.raises(DiffrtError, match="set_lora_scale was called inside a call"):
            lora_pipe("a cat", num_inference_steps=1, progress=lambda i: lora_pipe.set_lora_scale(0.5))
    finally:
        lora_pipe.set_lora_scale(1.0)


def test_scale_changes_never_accumulate(lora_pipe):
    before = weights(lora_pipe)
    for scale in (0.3, 2.0, 0.0, 1.0):
        lora_pipe.set_lora_scale(scale)
    after = weights(lora_pipe)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_change_that_failed_partway_is_refused_until_one_succeeds(lora_pipe, monkeypatch):
    """From a review: a scale change that raised halfway (a refit that failed on the UNet after the text encoder, a
    re-fuse that raised) left weights at mixed strengths, and the next call generated on them, reporting lora_scale
    nan. Calls are refused, by name, until set_lora_scale succeeds; that one starts from the base weights."""
    import diffrt.export.lora_fuse as lora_fuse
    from diffrt.errors import DiffrtError

    opened = run(lora_pipe)
    with monkeypatch.context() as patch:
        fuse = lora_fuse.fuse_loras

        def halfway(modules, files):  # the weights changed, then a failure
            fuse(modules, files)
            raise RuntimeError("out of memory")

        patch.setattr(lora_fuse, "fuse_loras", halfway)
        with pytest.raises(RuntimeError, match="out of memory"):
            lora_pipe.set_lora_scale(0.5)
    with pytest.raises(DiffrtError, match="failed partway, leaving weights at mixed strengths; call set_lora_scale again"):
        run(lora_pipe)
    lora_pipe.set_lora_scale(1.0)
    assert torch.equal(run(lora_pipe), opened)


def test_a_lora_strength_that_overflows_is_named(lora_pipe):
    """From a review: a huge scale overflowed the fp32 text encoder, and the error advised --precision fp32 alone."""
    from diffrt.errors import NonFiniteOutputError

    lora_pipe.set_lora_scale(1e30)
    try:
        with pytest.raises(NonFiniteOutputError, match=r"or a smaller LoRA strength \(lora_scale 1e\+30 times the LoRA scales opened\)"):
            run(lora_pipe)
    finally:
        lora_pipe.set_lora_scale(1.0)


def test_scale_equals_diffusers_lora_scale(t2i_folder, lora, lora_pipe):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(t2i_folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(lora, adapter_name="a")
    ref.set_adapters(["a"], adapter_weights=[0.8])
    expected = ref("a photo of the cat", num_inference_steps=STEPS, guidance_scale=5.0, output_type="pt",
                   generator=torch.Generator("cpu").manual_seed(3), cross_attention_kwargs={"scale": 0.5}).images
    lora_pipe.set_lora_scale(0.5)
    try:
        assert (run(lora_pipe) - expected).abs().max() <= 1e-4
    finally:
        lora_pipe.set_lora_scale(1.0)


def test_refused_where_the_weights_cannot_change(t2i_folder, lora, tmp_path):
    plain = open_text_to_image_pipeline(t2i_folder, "torch", CPU)
    plain.set_lora_scale(1.0)  # the scale it runs at: always accepted
    with pytest.raises(DiffrtError, match=r"lora_scale 0.5: this model runs no LoRA; open a diffusers folder with --lora"):
        plain.set_lora_scale(0.5)

    from diffrt.export.options import ExportOptions
    from diffrt.export.text_to_image import export_text_to_image

    out = tmp_path / "baked"
    export_text_to_image(t2i_folder, out, ExportOptions(loras=[(str(lora), 0.8)], verify=False), [])
    baked = open_text_to_image_pipeline(out, "onnxruntime", CPU)
    assert baked.runtime_metadata()["lora_scale"] == 1.0
    baked.set_lora_scale(1.0)
    with pytest.raises(DiffrtError, match=r"lora_scale 2: .*baked into its onnxruntime graphs at export"):
        baked.check_lora_scale(2.0)
    # From the t2i review: a negative strength opened (as in diffusers' fuse_lora and set_adapters: slider LoRAs) but
    # was refused at run time. Now the same weights either way; NaN refused.
    on_torch = open_text_to_image_pipeline(out, "torch", CPU)
    on_torch.set_lora_scale(-0.5)
    kwargs = dict(num_inference_steps=2, seed=4, output_type="pt")
    backwards = open_text_to_image_pipeline(t2i_folder, "torch", CPU, loras=[(lora, -0.4)])
    torch.testing.assert_close(on_torch("a cat", **kwargs).images, backwards("a cat", **kwargs).images, rtol=0, atol=2e-6)
    assert not torch.allclose(on_torch("a cat", **kwargs).images, plain("a cat", **kwargs).images, atol=1e-3)
    with pytest.raises(DiffrtError, match="lora_scale must be a finite number, got nan"):
        on_torch.set_lora_scale(float("nan"))


def test_pixel_artifact_on_torch_scales_its_lora(classemb_model_dir, tmp_path):
    """A pixel artifact's LoRA, run by its PyTorch source, takes a new strength like a text-to-image one."""
    from test_tensorrt import make_lora

    from diffrt.export.artifact import export_pixel_model
    from diffrt.export.options import ExportOptions
    from diffrt.runtime.loading import open_pixel_pipeline

    lora = make_lora(classemb_model_dir, tmp_path / "pixel_lora.safetensors", seed=2)
    half, full = tmp_path / "half", tmp_path / "full"
    for out, scale in ((half, 0.25), (full, 0.5)):
        export_pixel_model(classemb_model_dir, out, ExportOptions(batch=(1, 2, 8), loras=[(str(lora), scale)], verify=False))
    pipe = open_pixel_pipeline(full, "torch", CPU)

    def sample(p):
        return p([1, 3], num_inference_steps=STEPS, guidance_scale=3.0, seed=1, output_type="pt").images

    at_full = sample(pipe)
    pipe.set_lora_scale(0.5)
    assert torch.equal(sample(pipe), sample(open_pixel_pipeline(half, "torch", CPU)))
    assert not torch.equal(sample(pipe), at_full)
    with pytest.raises(DiffrtError, match="baked into its onnxruntime graphs"):
        open_pixel_pipeline(full, "onnxruntime", CPU).set_lora_scale(0.5)


def test_generate_takes_lora_for_pixel_models(classemb_model_dir, tmp_path):
    """`diffrt generate --lora` on a pixel model fuses it (torch) or exports with it baked in
    (onnxruntime), as for text-to-image models; an artifact keeps the LoRA it was exported with."""
    from test_tensorrt import make_lora

    from diffrt.errors import ArtifactError
    from diffrt.export.artifact import export_pixel_model
    from diffrt.export.options import ExportOptions
    from diffrt.generate import GenerateRequest, generate
    from diffrt.runtime.loading import open_pixel_pipeline

    lora = make_lora(classemb_model_dir, tmp_path / "pixel_lora.safetensors", seed=4)
    artifact = tmp_path / "artifact"
    export_pixel_model(classemb_model_dir, artifact, ExportOptions(batch=(1, 2, 8), loras=[(str(lora), 0.7)], verify=False))
    request = GenerateRequest(model=str(classemb_model_dir), class_label=2, num_images=2, num_inference_steps=STEPS, seed=5)
    fused = generate(replace(request, loras=[(str(lora), 0.7)])).images
    assert not torch.equal(fused, generate(request).images)
    assert torch.equal(generate(replace(request, loras=[(str(lora), 1.4)], lora_scale=0.5)).images, fused)  # --lora-scale
    # On ONNX Runtime the LoRA is baked in at export: --lora-scale goes into the strength it is exported at (it was
    # refused after the export: "baked in", when one at 0.7 was all the run needed).
    on_ort = generate(replace(request, backend="onnxruntime", loras=[(str(lora), 1.4)], lora_scale=0.5))
    assert on_ort.backend == "onnxruntime" and (on_ort.images - fused).abs().max() < 1e-3
    assert on_ort.metadata["lora_scale"] == 0.5  # the strength asked for, folded in or not
    # An artifact's --lora names the LoRA it was exported with, at its own scale: --lora-scale scales that one.
    at_half = generate(replace(request, model=str(artifact), backend="torch", loras=[(str(lora), 0.7)], lora_scale=0.5))
    assert torch.equal(at_half.images, generate(replace(request, loras=[(str(lora), 0.35)])).images)
    assert at_half.metadata["lora_scale"] == 0.5
    expected = open_pixel_pipeline(artifact, "torch", CPU)([2, 2], num_inference_steps=STEPS, guidance_scale=DEFAULT_PIXEL_GUIDANCE_SCALE,
                                                           seed=5, output_type="pt").images
    assert torch.equal(fused, expected)
    with pytest.raises(ArtifactError, match=r"has LoRA baked in at export \(pixel_lora.safetensors:0.7\)"):
        generate(replace(request, model=str(artifact), backend="onnxruntime", loras=[(str(lora), 0.3)]))
    plain = export_pixel_model(classemb_model_dir, tmp_path / "plain", ExportOptions(batch=(1, 2, 8), verify=False)).folder
    with pytest.raises(ArtifactError, match=r"plain was exported without LoRA; other LoRAs need a re-export"):  # read "(none)"
        generate(replace(request, model=str(plain), backend="onnxruntime", loras=[(str(lora), 0.3)]))



def test_metadata_says_whether_the_lora_scale_can_change(t2i_folder, lora, tmp_path):
    """What the demo reads to show its LoRA slider: PyTorch can change the strength, a LoRA baked into ONNX cannot."""
    from diffrt.export.options import ExportOptions
    from diffrt.export.text_to_image import export_text_to_image

    meta = open_text_to_image_pipeline(t2i_folder, "torch", CPU, loras=[(lora, 0.8)]).runtime_metadata()
    assert (meta["lora_scale"], meta["lora_scalable"]) == (1.0, True)
    export_text_to_image(t2i_folder, tmp_path / "baked", ExportOptions(loras=[(str(lora), 0.8)], verify=False), [])
    assert open_text_to_image_pipeline(tmp_path / "baked", "onnxruntime", CPU).runtime_metadata()["lora_scalable"] is False
    assert "lora_scale" not in open_text_to_image_pipeline(t2i_folder, "torch", CPU).runtime_metadata()


# --- DoRA: the scale sits inside the DoRA normalisation, so every change recomputes from the base -------


@pytest.fixture(scope="module")
def dora(t2i_folder, tmp_path_factory):
    from test_lora import write_peft_lora

    return write_peft_lora(t2i_folder, tmp_path_factory.mktemp("dora"), seed=12, use_dora=True)


def test_dora_scale_equals_diffusers_fuse_lora_at_that_scale(t2i_folder, dora):
    """Scale s on the torch backend gives bit for bit the weights of opening at s * 0.8, and the
    UNet's equal diffusers' fuse_lora(lora_scale=s * 0.8); 0 is not the base model for DoRA, as in
    diffusers: the base weights rescaled to the learnt magnitudes. Back and forth never accumulates."""
    from diffusers import UNet2DConditionModel

    pipe = open_text_to_image_pipeline(t2i_folder, "torch", CPU, loras=[(dora, 0.8)])
    opened = weights(pipe)
    base = weights(open_text_to_image_pipeline(t2i_folder, "torch", CPU))
    for scale in (0.5, 0.0):
        pipe.set_lora_scale(scale)
        ours = weights(pipe)
        at_open = weights(open_text_to_image_pipeline(t2i_folder, "torch", CPU, loras=[(dora, 0.8 * scale)]))
        assert all(torch.equal(ours[k], at_open[k]) for k in ours)
        reference = UNet2DConditionModel.from_pretrained(t2i_folder / "unet")
        reference.load_lora_adapter(str(dora), prefix="unet", adapter_name="a", use_safetensors=True)  # reads its LoraConfig
        reference.fuse_lora(lora_scale=0.8 * scale)
        reference.unload_lora()
        for name, value in reference.state_dict().items():  # pipe.unet.module wraps the UNet: "unet.unet."
            assert (ours[f"unet.unet.{name}"] - value).abs().max() <= 1e-6 * value.abs().max(), name
        assert any(not torch.equal(ours[k], base[k]) for k in ours)  # scale 0 too: DoRA rescales the base
    for scale in (2.0, 0.3, 1.0):
        pipe.set_lora_scale(scale)
    assert all(torch.equal(opened[k], v) for k, v in weights(pipe).items())


def test_lora_bias_terms_take_the_scale_and_come_back(t2i_folder, tmp_path):
    """A lora_B.bias changes biases: they are saved with the weights, so scale 0 is the base model
    again, bit for bit, and back and forth never accumulates."""
    from test_lora import write_peft_lora

    path = write_peft_lora(t2i_folder, tmp_path, seed=13, lora_bias=True)
    pipe = open_text_to_image_pipeline(t2i_folder, "torch", CPU, loras=[(path, 0.8)])
    opened, base = weights(pipe), weights(open_text_to_image_pipeline(t2i_folder, "torch", CPU))
    assert any(k.endswith(".bias") and not torch.equal(opened[k], base[k]) for k in opened)
    pipe.set_lora_scale(0.0)
    assert all(torch.equal(v, base[k]) for k, v in weights(pipe).items())
    for scale in (2.0, 0.3, 1.0):
        pipe.set_lora_scale(scale)
    assert all(torch.equal(v, opened[k]) for k, v in weights(pipe).items())


class RecordingEngine:
    """Stands in for a running TensorRTBackend: keeps what EngineLora refits it with."""

    def __init__(self):
        self.weights = None

    def refit(self, weights):
        self.weights = {name: weights.weights[name].clone() for name in weights.patched}
        return {"patched": len(weights.patched)}


def test_engine_dora_scale_refits_from_the_base(classemb_model_dir, tmp_path):
    """EngineLora at lora_scale s refits the DoRA fused at s times its scale from the ONNX's base
    weights (what `refit_weights` gives at that scale), never a delta scaled from the last refit."""
    from test_refit import make_dora

    from diffrt.export.artifact import export_pixel_model
    from diffrt.export.options import ExportOptions
    from diffrt.export.lora import read_lora
    from diffrt.export.refit import read_weight_map, refit_weights, write_weight_map
    from diffrt.models import load_pixel_model
    from diffrt.runtime.lora_scale import EngineLora

    folder = export_pixel_model(classemb_model_dir, tmp_path / "onnx", ExportOptions(batch=(1, 2, 4), verify=False)).folder
    onnx_path = folder / "unet" / "model.onnx"
    write_weight_map(onnx_path, {"unet": load_pixel_model(classemb_model_dir).unet.unet})
    dora = make_dora(classemb_model_dir, tmp_path / "dora.safetensors", seed=5)
    engine = RecordingEngine()
    lora = EngineLora(folder, {"unet": engine}, lambda: [(dora, 0.8)])
    seen = []
    for scale in (0.5, 2.0, 0.5):
        lora.set_scale(scale)
        expected = refit_weights(onnx_path, read_weight_map(onnx_path), [(read_lora(dora), 0.8 * scale)])
        assert engine.weights.keys() == set(expected.patched)
        assert all(torch.equal(engine.weights[n], expected.weights[n]) for n in expected.patched)
        seen.append(engine.weights)
    assert all(torch.equal(seen[0][n], seen[2][n]) for n in seen[0])
    assert any(not torch.equal(seen[0][n], seen[1][n]) for n in seen[0])
