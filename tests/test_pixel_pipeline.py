"""The pixel-space pipeline against diffusers' DDIMPipeline, across backends, with guidance."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from diffrt.errors import ArtifactError, BackendUnavailableError, DiffrtError, NonFiniteOutputError, ShapeOutOfRangeError
from diffrt.export.artifact import export_pixel_model
from diffrt.export.options import ExportOptions
from diffrt.models import load_pixel_model
from diffrt.runtime.guidance import Guidance, color_guidance
from diffrt.runtime.loading import artifact_pixel_pipeline, open_pixel_pipeline, torch_pixel_pipeline

CPU = "cpu"  # references are computed on the CPU; pin the pipelines there too, GPU or not


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_torch_backend_equals_diffusers_ddim_pipeline(uncond_model_dir, eta):
    from diffusers import DDIMPipeline

    ref = DDIMPipeline.from_pretrained(uncond_model_dir)
    want = ref(batch_size=2, generator=torch.Generator("cpu").manual_seed(7), eta=eta, num_inference_steps=10,
               output_type="np").images
    got = open_pixel_pipeline(uncond_model_dir, "torch", CPU)(num_images=2, num_inference_steps=10, eta=eta, seed=7,
                                                         output_type="np").images
    assert got.shape == want.shape == (2, 16, 16, 3)
    assert abs(got - want).max() <= 1e-4


def test_list_of_generators_equals_diffusers_ddim_pipeline(uncond_model_dir):
    """diffusers' list of generators: image i's initial noise and eta noise come from generator i."""
    from diffusers import DDIMPipeline

    def generators(*seeds):
        return [torch.Generator("cpu").manual_seed(s) for s in seeds]

    kwargs = dict(eta=0.7, num_inference_steps=10, output_type="np")
    want = DDIMPipeline.from_pretrained(uncond_model_dir)(batch_size=3, generator=generators(7, 8, 9), **kwargs).images
    pipe = open_pixel_pipeline(uncond_model_dir, "torch", CPU)
    got = pipe(num_images=3, generator=generators(7, 8, 9), **kwargs).images
    assert got.shape == want.shape == (3, 16, 16, 3)
    assert abs(got - want).max() <= 1e-4
    alone = pipe(num_images=1, seed=8, **kwargs).images  # image 1 is seed 8's own image
    assert abs(got[1] - alone[0]).max() <= 1e-4
    with pytest.raises(DiffrtError, match=r"got a list of 2 generators for a batch of 3 images") as info:
        pipe(num_images=3, generator=generators(7, 8), num_inference_steps=1)
    assert "\n" not in str(info.value)


def test_assigning_a_scheduler_takes_a_samplers_name_or_config_and_refuses_the_rest(uncond_model_dir):
    """From a review: the pixel pipeline's `scheduler` was a plain attribute, so `pipe.scheduler = "dpm"` (or None, or a
    diffusers scheduler object) was taken and the next call failed with an AttributeError from inside the sampler.
    It takes what the text-to-image pipeline takes: a config or a sampler's name on the model's schedule."""
    from diffusers import DPMSolverMultistepScheduler

    from diffrt.runtime.dpm import DPMConfig

    pipe = open_pixel_pipeline(uncond_model_dir, "torch", CPU)
    own = pipe.scheduler
    run = lambda: pipe(num_images=1, num_inference_steps=3, seed=1, output_type="pt").images  # noqa: E731
    for wrong in (None, DPMSolverMultistepScheduler(), "heun"):
        with pytest.raises(DiffrtError, match="scheduler"):
            pipe.scheduler = wrong
        assert pipe.scheduler is own
    pipe.scheduler = "dpm"
    assert isinstance(pipe.scheduler, DPMConfig) and pipe.scheduler.num_train_timesteps == own.num_train_timesteps
    torch.testing.assert_close(run(), pipe(num_images=1, num_inference_steps=3, seed=1, output_type="pt", scheduler="dpm").images)
    pipe.scheduler = own
    torch.testing.assert_close(run(), pipe(num_images=1, num_inference_steps=3, seed=1, output_type="pt", scheduler="ddim").images)


def test_randn_draws_each_generator_block_with_its_own_shape():
    from diffrt.runtime.sampling import GeneratorBlocks, randn

    def g(seed):
        return torch.Generator("cpu").manual_seed(seed)

    # 75 values a row: CPU randn fills 16 at a time, so one [2, ...] draw is not two [1, ...] draws.
    cpu, shape = torch.device("cpu"), (5, 3, 5, 5)
    blocks = randn(shape, GeneratorBlocks(((g(1), 2), (g(2), 3))), cpu, torch.float32)
    assert torch.equal(blocks, torch.cat([torch.randn(2, 3, 5, 5, generator=g(1)), torch.randn(3, 3, 5, 5, generator=g(2))]))
    one_by_one = g(1)
    assert not torch.equal(blocks[:2], torch.cat([torch.randn(1, 3, 5, 5, generator=one_by_one) for _ in range(2)]))
    rows = randn(shape, [g(s) for s in range(5)], cpu, torch.float32)  # a list: one row each, as diffusers' randn_tensor
    assert torch.equal(rows, torch.cat([torch.randn(1, 3, 5, 5, generator=g(s)) for s in range(5)]))
    assert torch.equal(randn(shape, GeneratorBlocks(((g(4), 5),)), cpu, torch.float32), randn(shape, g(4), cpu, torch.float32))
    with pytest.raises(DiffrtError, match="cover 4 rows but the batch has 5 images"):
        randn(shape, GeneratorBlocks(((g(1), 4),)), cpu, torch.float32)


@pytest.fixture(scope="module")
def classemb_artifact(classemb_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "classemb"
    export_pixel_model(classemb_model_dir, out, ExportOptions(batch=(1, 4, 16)))
    return out


def test_onnxruntime_matches_torch_with_cfg(classemb_model_dir, classemb_artifact):
    kwargs = dict(num_inference_steps=8, guidance_scale=3.0, seed=3, output_type="pt")
    labels = [0, 1, 2, 3]
    eager = torch_pixel_pipeline(load_pixel_model(classemb_model_dir))(labels, **kwargs)
    ort = artifact_pixel_pipeline(classemb_artifact, "onnxruntime", CPU)(labels, **kwargs)
    assert ort.backend == "onnxruntime" and eager.backend == "torch"  # RELIABILITY #15: the backend that ran
    assert (ort.images - eager.images).abs().max().item() <= 1e-3


def test_cfg_changes_the_images(classemb_model_dir):
    pipe = torch_pixel_pipeline(load_pixel_model(classemb_model_dir))
    a = pipe([1, 2], num_inference_steps=5, guidance_scale=1.0, seed=0, output_type="pt").images
    b = pipe([1, 2], num_inference_steps=5, guidance_scale=4.0, seed=0, output_type="pt").images
    assert (a - b).abs().max() > 1e-3


def _mean_colour_distance(images: torch.Tensor, target: torch.Tensor) -> float:
    return (images.mean(dim=(2, 3)) - target).abs().mean().item()


@pytest.mark.parametrize("mode", ["x0", "through_unet"])
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_colour_guidance_moves_mean_colour_toward_target(classemb_model_dir, classemb_artifact, mode, backend):
    pipe = (torch_pixel_pipeline(load_pixel_model(classemb_model_dir)) if backend == "torch"
            else artifact_pixel_pipeline(classemb_artifact, backend, CPU))
    target = torch.tensor([1.0, 0.1, 0.1])
    kwargs = dict(num_inference_steps=8, guidance_scale=2.0, seed=1, output_type="pt")
    plain = pipe([0, 1, 2, 3], **kwargs).images
    guided = pipe([0, 1, 2, 3], guidance=[color_guidance("#ff1a1a", 20.0, mode=mode)], **kwargs).images
    before, after = _mean_colour_distance(plain, target), _mean_colour_distance(guided, target)
    assert after < before - 0.05, (before, after)


def test_bad_requests_get_one_clear_error(classemb_model_dir, classemb_artifact):
    pipe = artifact_pixel_pipeline(classemb_artifact, "onnxruntime", CPU)
    with pytest.raises(DiffrtError, match=r"class label 9 is out of range; this model has classes 0\.\.3"):
        pipe([9], num_inference_steps=2)
    with pytest.raises(DiffrtError, match=r"class label 1e\+20 is out of range"):  # read -9223372036854775808 (int64 wrap)
        pipe([1e20], num_inference_steps=2)
    with pytest.raises(ShapeOutOfRangeError, match=r"classifier-free guidance.*\[1, 16\]"):
        pipe(list(range(4)) * 3, guidance_scale=2.0, num_inference_steps=2)
    with pytest.raises(ShapeOutOfRangeError, match=r"height 32 is outside the built range \[16, 16\]"):
        pipe([1], height=32, width=32, num_inference_steps=2)
    with pytest.raises(DiffrtError, match=r"height must be >= 1, got 0"):  # was the model's size (`height or default`)
        pipe([1], height=0, num_inference_steps=2)
    with pytest.raises(DiffrtError, match="eta"):
        pipe([1], eta=2.0, num_inference_steps=2)
    with pytest.raises(DiffrtError, match="class-conditioned"):
        pipe(None, num_inference_steps=2)


def test_nan_in_a_component_is_reported_with_its_name(classemb_model_dir):
    model = load_pixel_model(classemb_model_dir)
    pipe = torch_pixel_pipeline(model)
    # Poison one weight: every prediction becomes NaN, as an fp16 overflow would.
    with torch.no_grad():
        model.unet.unet.conv_out.bias[0] = float("nan")
    with pytest.raises(NonFiniteOutputError, match="unet produced") as caught:
        pipe([0], num_inference_steps=2)
    # From a review: the hint was "try --precision fp32 for this component", a flag only `diffrt export` has, and one
    # for every component, to a model already in fp32; it names both causes now.
    assert "`diffrt export --precision fp32`" in str(caught.value) and "in fp32 its weights or inputs hold NaN/inf" in str(caught.value)


@pytest.mark.parametrize("fixture", ["classchan_model_dir", "uncond_model_dir"])
def test_other_variants_export_and_match(fixture, request, tmp_path):
    folder = request.getfixturevalue(fixture)
    out = tmp_path / "art"
    result = export_pixel_model(folder, out, ExportOptions(batch=(1, 2, 8)))
    assert result.manifest["components"]["unet"]["parity"]["onnxruntime"]["passed"]
    model = load_pixel_model(folder)
    labels = [0, 3] if model.info.conditioning != "none" else None
    kwargs = dict(num_images=None if labels else 2, num_inference_steps=5, guidance_scale=2.0, seed=2, output_type="pt")
    eager = torch_pixel_pipeline(model)(labels, **kwargs).images
    ort = artifact_pixel_pipeline(out, "onnxruntime", CPU)(labels, **kwargs).images
    assert (ort - eager).abs().max().item() <= 1e-3


# --- guidance, CFG and the PyTorch fallback (issue #5) ----------------------------------------------------

NULL_LABEL = 4  # the extra label a 4-class model reserves for "no class" (models.PixelModelInfo), written out here


def test_class_cfg_step_is_null_plus_scale_times_difference(classemb_model_dir):
    """One DDIM step with CFG equals eps(null) + s * (eps(c) - eps(null)) computed by hand, stepped by
    diffusers' DDIMScheduler: a pipeline that used another null label would not match."""
    from diffusers import DDIMScheduler

    model = load_pixel_model(classemb_model_dir)
    pipe = torch_pixel_pipeline(model)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    labels, scale = torch.tensor([1, 3]), 3.0
    got = pipe(labels, latents=x, num_inference_steps=1, guidance_scale=scale, output_type="pt").images

    scheduler = DDIMScheduler.from_config(model.scheduler.to_scheduler_config())
    scheduler.set_timesteps(1)
    (t,) = scheduler.timesteps
    ts = torch.full((2,), float(t))
    with torch.no_grad():
        eps_null = model.unet(x, ts, torch.full((2,), NULL_LABEL))
        eps_c = model.unet(x, ts, labels)
        other_null = model.unet(x, ts, torch.zeros(2, dtype=torch.int64))
    want = scheduler.step(eps_null + scale * (eps_c - eps_null), t, x, eta=0.0).prev_sample
    assert (got - (want / 2 + 0.5).clamp(0, 1)).abs().max() <= 1e-5
    wrong = scheduler.step(other_null + scale * (eps_c - other_null), t, x, eta=0.0).prev_sample
    assert (got - (wrong / 2 + 0.5).clamp(0, 1)).abs().max() > 1e-3  # the check can tell null labels apart


def test_guidance_every_3_runs_its_loss_on_steps_0_3_6(uncond_model_dir):
    pipe = torch_pixel_pipeline(load_pixel_model(uncond_model_dir))
    unet_calls, steps, shapes = [], [], []
    run = pipe.unet.run
    pipe.unet.run = lambda feed: unet_calls.append(1) or run(feed)  # unconditional: one UNet call a step

    def loss(images):
        steps.append(len(unet_calls) - 1)  # mode x0: the loss follows its own step's UNet call
        shapes.append(images.shape)
        return images.mean()

    pipe(num_images=2, num_inference_steps=7, seed=0, guidance=[Guidance(loss, 1.0, every=3)], output_type="pt")
    assert len(unet_calls) == 7
    assert steps == [0, 3, 6] and all(shape == (2, 3, 16, 16) for shape in shapes)


@pytest.mark.slow  # torch.compile on the CPU: ~55 s cold, ~16 s with inductor's cache warm (2 shared cores)
def test_torch_compile_matches_eager(uncond_model_dir):
    model = load_pixel_model(uncond_model_dir)
    kwargs = dict(num_images=1, num_inference_steps=3, seed=4, output_type="pt")
    eager = torch_pixel_pipeline(model)(**kwargs)
    t0 = time.perf_counter()
    compiled = torch_pixel_pipeline(model, compile=True)(**kwargs)
    assert compiled.backend == "torch-compile" and eager.backend == "torch"
    assert (compiled.images - eager.images).abs().max().item() <= 1e-3, f"compiled in {time.perf_counter() - t0:.0f} s"


def test_through_unet_on_an_artifact_checks_the_fallback_against_the_engine(classemb_model_dir, classemb_artifact):
    pipe = artifact_pixel_pipeline(classemb_artifact, "onnxruntime", CPU)
    guidance = [color_guidance("#ff0000", 10.0, mode="through_unet")]
    start = time.perf_counter()
    result = pipe([0, 2], num_inference_steps=2, guidance_scale=2.0, seed=0, guidance=guidance, output_type="pt")
    wall = time.perf_counter() - start
    assert result.backend == "onnxruntime" and torch.isfinite(result.images).all()
    # The fallback's first load is reported apart from the call's time, which leaves it out.
    loaded = result.metadata["load_seconds"]
    assert loaded > 0 and result.seconds <= wall - loaded
    # The guided images are eager PyTorch's for the same call (the engine's eps steps, the fallback's gradient steers),
    # and the guidance acts: a fallback that did nothing would leave the unguided images.
    eager = torch_pixel_pipeline(load_pixel_model(classemb_model_dir))
    same = eager([0, 2], num_inference_steps=2, guidance_scale=2.0, seed=0, guidance=guidance, output_type="pt").images
    unguided = pipe([0, 2], num_inference_steps=2, guidance_scale=2.0, seed=0, output_type="pt").images
    assert (result.images - same).abs().max() <= 1e-3 and (result.images - unguided).abs().max() > 1e-2
    assert result.metadata["guidance_pytorch"] == ["unet"]  # reported, where backend alone said onnxruntime (RELIABILITY #15)
    assert pipe([0, 2], num_inference_steps=2, guidance_scale=2.0, seed=0, guidance=guidance).metadata["load_seconds"] == 0
    assert next(pipe.torch_module("unet", "test").parameters()).device == pipe.device
    # A fallback with other weights than the engine must not steer the guidance (RELIABILITY #16).
    other = load_pixel_model(classemb_model_dir).unet
    with torch.no_grad():
        other.unet.conv_out.weight.mul_(1.5)
    pipe._torch["unet"] = other
    with pytest.raises(DiffrtError, match=r"differs from the onnxruntime UNet .*limit 5e-03 for a fp32 engine"):
        pipe([0, 2], num_inference_steps=2, guidance_scale=2.0, seed=0, guidance=guidance)


def test_calls_that_first_need_the_fallback_at_once_load_it_once(classemb_artifact):
    """From the Python API review: four threads making their first guided call together each loaded a PyTorch UNet
    (an SD UNet is 3.4 GB: four in memory at once); the images were right, and are."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    pipe = artifact_pixel_pipeline(classemb_artifact, "onnxruntime", CPU)
    load, loads, arrived = pipe._torch["unet"], [], threading.Barrier(4)

    def slow_load():
        loads.append(1)
        time.sleep(0.5)  # long enough for every thread to arrive while the first loads
        return load()

    pipe._torch["unet"] = slow_load
    guidance = [color_guidance("#ff0000", 10.0, mode="through_unet")]

    def call(seed):
        arrived.wait()
        return pipe([1], num_inference_steps=2, seed=seed, guidance=guidance, output_type="pt").images

    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(call, range(4)))
    assert len(loads) == 1
    for seed, image in enumerate(images):  # each as the same call alone
        assert torch.equal(image, pipe([1], num_inference_steps=2, seed=seed, guidance=guidance, output_type="pt").images)


def test_lazy_fallback_unet_is_moved_to_the_pipeline_device(classemb_artifact):
    # The fallback is loaded on the CPU; on a CUDA pipeline it must follow the pipeline to the GPU.
    # A CPU machine stands in with the meta device, which any .to(pipe.device) reaches too.
    pipe = artifact_pixel_pipeline(classemb_artifact, "onnxruntime", CPU)
    pipe.unet.device = torch.device("meta")
    assert next(pipe.torch_module("unet", "test").parameters()).device.type == "meta"


def test_nan_in_the_through_unet_fallback_is_named(classemb_model_dir, classemb_artifact):
    pipe = artifact_pixel_pipeline(classemb_artifact, "onnxruntime", CPU)
    poisoned = load_pixel_model(classemb_model_dir).unet
    with torch.no_grad():
        poisoned.unet.conv_out.bias[0] = float("nan")
    pipe._torch["unet"] = poisoned
    with pytest.raises(NonFiniteOutputError, match=r"^unet \(the PyTorch UNet for through_unet guidance\) produced"):
        pipe([1], num_inference_steps=2, seed=0, guidance=[color_guidance("#ff0000", 10.0, mode="through_unet")])


def test_a_source_changed_since_export_is_refused(classemb_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    source = shutil.copytree(classemb_model_dir, tmp_path / "source")
    artifact = export_pixel_model(source, tmp_path / "art", ExportOptions(batch=(1, 2, 8), verify=False)).folder
    weights = source / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    name = next(iter(state))
    state[name] = state[name] + 1.0
    save_file(state, weights)
    pipe = artifact_pixel_pipeline(artifact, "onnxruntime", CPU)
    with pytest.raises(ArtifactError, match="changed since export"):
        pipe([1], num_inference_steps=2, seed=0, guidance=[color_guidance("#ff0000", 10.0, mode="through_unet")])
    with pytest.raises(ArtifactError, match="changed since export"):
        open_pixel_pipeline(artifact, "torch", CPU)


def test_strict_refuses_torch_weights_for_an_artifact(classemb_artifact, caplog):
    with pytest.raises(BackendUnavailableError, match="strict mode refuses"):
        open_pixel_pipeline(classemb_artifact, "torch", CPU, strict=True)
    pipe = open_pixel_pipeline(classemb_artifact, "torch", CPU)
    assert pipe.backend == "torch" and any("source model's PyTorch weights" in r.getMessage() for r in caplog.records)


def test_onnxruntime_provider_fallback_warns_or_fails_under_strict(classemb_artifact, monkeypatch, caplog):
    # A CPU-only ONNX Runtime asked for CUDA runs on the CPU, as a CUDA EP without its libraries would.
    from diffrt.runtime.backends import onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend, "default_providers", lambda *args, **kwargs: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BackendUnavailableError, match=r"did not start CUDAExecutionProvider.*strict mode refuses"):
        artifact_pixel_pipeline(classemb_artifact, "onnxruntime", CPU, strict=True)
    pipe = artifact_pixel_pipeline(classemb_artifact, "onnxruntime", CPU)
    assert any("did not start CUDAExecutionProvider" in r.getMessage() for r in caplog.records)
    result = pipe([1], num_inference_steps=1, seed=0)
    assert result.metadata["providers"] == {"unet": ["CPUExecutionProvider"]}  # what ran, not what was asked for
    assert result.metadata["components"] == {"unet": "onnxruntime"} and result.metadata["cuda_graph"] is False


def test_a_cuda_session_that_fell_back_to_the_cpu_binds_host_memory(classemb_artifact, monkeypatch):
    # ONNX Runtime without a GPU provider cannot read CUDA memory ("no data transfer registered"
    # in bind_input), so the non-strict fallback must bind host memory to run at all.
    from diffrt.runtime.backends import onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend, "default_providers", lambda *args, **kwargs: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    on_cpu = artifact_pixel_pipeline(classemb_artifact, "onnxruntime", CPU).unet
    backend = ort_backend.OnnxRuntimeBackend(classemb_artifact / "unet" / "model.onnx", on_cpu.spec, device="cuda")
    assert backend.providers == ["CPUExecutionProvider"] and backend._io_device == torch.device("cpu")
    feed = {"sample": torch.randn(2, 3, 16, 16), "timestep": torch.full((2,), 10.0), "class_labels": torch.tensor([0, 1])}
    # The reference: ONNX Runtime's own numpy API, no I/O binding, so none of the backend's code.
    want = torch.from_numpy(on_cpu.session.run(["noise_pred"], {n: t.numpy() for n, t in feed.items()})[0])
    backend.device = torch.device("cpu")  # the outputs as bound in host memory, before any move
    assert torch.equal(backend.run(feed)["noise_pred"], want)  # the same CPU kernels: bit for bit
    backend.device = torch.device("meta")  # stands in for the CUDA device a CPU machine lacks: outputs go back to it
    got = backend.run(feed)["noise_pred"]
    assert got.device.type == "meta" and got.shape == want.shape


def test_an_artifact_with_lora_falls_back_to_pytorch_with_the_same_lora(classemb_model_dir, tmp_path):
    # RELIABILITY #16: guidance through the UNet must use the artifact's LoRA at its scale, and the
    # torch backend over the artifact must run the weights the artifact runs, not the bare source.
    from test_tensorrt import make_lora

    lora = make_lora(classemb_model_dir, tmp_path / "lora.safetensors", seed=3)
    artifact = export_pixel_model(classemb_model_dir, tmp_path / "art",
                                  ExportOptions(batch=(1, 2, 8), loras=[(str(lora), 0.7)])).folder
    kwargs = dict(num_inference_steps=4, guidance_scale=2.0, seed=1, output_type="pt")
    ort = artifact_pixel_pipeline(artifact, "onnxruntime", CPU)([0, 2], **kwargs).images
    torch_over_artifact = open_pixel_pipeline(artifact, "torch", CPU)([0, 2], **kwargs).images
    bare_source = open_pixel_pipeline(classemb_model_dir, "torch", CPU)([0, 2], **kwargs).images
    assert (torch_over_artifact - ort).abs().max().item() <= 1e-3
    assert (bare_source - ort).abs().max().item() > 1e-2  # the LoRA matters, so the check above can fail

    guidance = [color_guidance("#ff0000", 10.0, mode="through_unet")]
    guided = artifact_pixel_pipeline(artifact, "onnxruntime", CPU)([0, 2], **kwargs, guidance=guidance)  # passes the agreement check
    torch_guided = open_pixel_pipeline(artifact, "torch", CPU)([0, 2], **kwargs, guidance=guidance).images
    assert (guided.images - torch_guided).abs().max() <= 1e-3 and (guided.images - ort).abs().max() > 1e-2

    lora.write_bytes(lora.read_bytes()[:-8] + b"\0" * 8)  # the LoRA file changed since export
    with pytest.raises(ArtifactError, match="missing or changed"):
        open_pixel_pipeline(artifact, "torch", CPU)


def test_a_size_the_unet_cannot_halve_is_one_line_on_eager_torch():
    """A 4-level UNet halves a side 3 times: 12 px would mismatch its skip connections inside the
    UNet; the pipeline refuses it by name first, and takes a multiple of 8."""
    from diffrt.errors import ShapeOutOfRangeError
    from diffrt.models import build_pixel_model, small_unet_config
    from diffrt.runtime.loading import torch_pixel_pipeline

    torch.manual_seed(0)
    config = small_unet_config(sample_size=16, widths=(16, 16, 16), attention=False)
    config.update(block_out_channels=[16] * 4, down_block_types=["DownBlock2D"] * 4, up_block_types=["UpBlock2D"] * 4)
    model = build_pixel_model(config)
    assert model.unet.size_multiple == 8
    pipe = torch_pixel_pipeline(model)
    with pytest.raises(ShapeOutOfRangeError, match="height 12 is not a multiple of 8; try 8"):
        pipe(num_images=1, num_inference_steps=1, height=12, width=12, output_type="pt")
    # The nearer multiple (from the CLI review: the pixel message gave no fix, the text-to-image one did).
    with pytest.raises(ShapeOutOfRangeError, match="width 15 is not a multiple of 8; try 16$"):
        pipe(num_images=1, num_inference_steps=1, height=16, width=15, output_type="pt")
    assert pipe(num_images=1, num_inference_steps=1, height=24, width=24, output_type="pt").images.shape == (1, 3, 24, 24)


@pytest.mark.parametrize("setting, words", [
    (dict(time_embedding_type="fourier"), "score-SDE"),
    (dict(class_embed_type="timestep"), "class_embed_type 'timestep'"),
    (dict(out_channels=6), "learned variance"),
])
def test_a_unet_the_ddim_loop_would_run_wrongly_is_refused_by_name(setting, words, tmp_path):
    """UNet2DModels that diffusers' DDIMPipeline cannot sample either (a fourier time embedding takes
    noise levels, class_embed_type takes class_labels that are not labels, a learned variance doubles
    the output) are refused from their config, before any weight is read."""
    from diffusers import UNet2DModel

    from diffrt.models import small_unet_config

    folder = tmp_path / "unet"
    UNet2DModel(**{**small_unet_config(8, 3, (16, 32)), **setting}).save_pretrained(folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()  # refused from the config alone
    with pytest.raises(DiffrtError, match=words):
        load_pixel_model(folder)
    with pytest.raises(DiffrtError, match=words):
        open_pixel_pipeline(folder, "torch", "cpu")


def _rewrite_json(path, **changes):
    import json

    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


PIXEL_DAMAGE = {  # from the loading review: each was a traceback (or, for a conditioning typo, a misleading label error)
    "diffrt-json-not-json": (lambda f: (f / "diffrt.json").write_text("{"), r"diffrt.json is not valid JSON"),
    "diffrt-json-unknown-key": (lambda f: _rewrite_json(f / "diffrt.json", foo=1), r"diffrt.json has keys diffrt does not write \(foo\)"),
    "conditioning-typo": (lambda f: _rewrite_json(f / "diffrt.json", conditioning="class_embeddings"),
                          r"conditioning 'class_embeddings' is none of none, class_embedding, class_channels"),
    "class-channels-on-a-plain-unet": (lambda f: _rewrite_json(f / "diffrt.json", conditioning="class_channels", num_classes=3,
                                                               class_embedding_dim=2),
                                       r"so the UNet should take 3 \+ 2 = 5 input channels; it takes 3"),
    "scheduler-not-json": (lambda f: (f / "scheduler" / "scheduler_config.json").write_text("{"), r"scheduler_config.json is not valid JSON"),
    "unet-lacks-a-tensor": (lambda f: _drop_pixel_tensor(f / "unet" / "diffusion_pytorch_model.safetensors", "conv_in.weight"),
                            r"unet: its weights lack 1 of the tensors its config.json makes \(e.g. conv_in.weight\)"),
}


def _drop_pixel_tensor(path, name):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, path)


@pytest.mark.parametrize("damage", PIXEL_DAMAGE)
def test_a_damaged_pixel_model_is_one_line_naming_its_file(uncond_model_dir, tmp_path, damage):
    folder = shutil.copytree(uncond_model_dir, tmp_path / "model")
    edit, message = PIXEL_DAMAGE[damage]
    edit(folder)
    with pytest.raises(DiffrtError, match=message) as info:
        load_pixel_model(folder)
    assert "\n" not in str(info.value)


def test_a_transformers_folder_is_not_taken_for_a_pixel_unet(t2i_folder):
    with pytest.raises(DiffrtError, match=r"text_encoder/config.json is a transformers CLIPTextModel folder, not a UNet2DModel"):
        load_pixel_model(t2i_folder / "text_encoder")


@pytest.mark.parametrize("state, words", [
    ({"w": torch.zeros(5, 3)}, r"holds w \(5, 3\) float32; a label embedding is one floating-point tensor named weight"),
    ({"weight": torch.zeros(5, 3, dtype=torch.int64)}, r"holds weight \(5, 3\) int64; a label embedding"),
    ({"weight": torch.zeros(5, 3), "extra": torch.zeros(1)}, r"holds extra \(1,\) float32, weight \(5, 3\) float32"),
    ({"weight": torch.zeros(5, 2)}, "holds label embeddings of 2 values but diffrt.json gives class_embedding_dim 3"),
])
def test_a_damaged_label_embedding_file_is_one_line(classchan_model_dir, tmp_path, state, words):
    """From a security review: a class-channels model's class_embedding/model.safetensors was indexed by `weight`
    and its shape unpacked unchecked: another key was a KeyError traceback, another width a size-mismatch one."""
    import shutil

    from safetensors.torch import save_file

    from diffrt.errors import DiffrtError
    from diffrt.models import load_pixel_model

    model = shutil.copytree(classchan_model_dir, tmp_path / "model")
    assert load_pixel_model(model).unet.net.class_embedding.weight.shape == (5, 3)  # what the fixture holds
    save_file(state, model / "class_embedding" / "model.safetensors")
    with pytest.raises(DiffrtError, match=words):
        load_pixel_model(model)
