"""Parity tests for diffrt.kernels: Triton kernel vs PyTorch reference vs the oracles.

The oracles are `ddim.ddim_step`, diffusers' `DDIMScheduler.step` and autograd through
`guidance.color_loss`. On CPU the kernels run in Triton's interpreter: `diffrt.kernels.launch`
decorates each kernel body on first use, as interpreted for CPU tensors, so no environment
variable has to be set before Triton is imported. The `gpu` tests run the compiled kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from diffrt.kernels import cfg_ddim, color_guidance, launch
from diffrt.errors import DiffrtError
from diffrt.runtime import ddim, guidance

SHAPES = [(1, 4, 8, 8), (2, 3, 16, 16), (2, 4, 64, 64), (3, 3, 17, 13)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Kernels compute in float32 and round once to the output dtype: allow about one ulp of that.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 1e-2)}
# (alpha_bar, alpha_bar_prev) of SD-1.5's schedule: first and last of 50 steps;
# at the first, x0 = (x - sqrt(1 - ab) eps) / 0.076 magnifies every rounding error.
ALPHA_PAIRS = [(0.0058, 0.0073), (0.9983, 0.9991)]


def make_cfg_inputs(shape, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    sample, eps_uncond, delta, noise = (torch.randn(shape, generator=gen) for _ in range(4))
    eps_cond = eps_uncond + 0.2 * delta  # conditional and unconditional outputs differ a little, as in practice
    return [t.to(device=device, dtype=dtype) for t in (sample, eps_uncond, eps_cond, noise)]


def assert_close(actual, expected):
    rtol, atol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def check_cfg_parity(shape, dtype, alphas, prediction_type, clip, eta, device="cpu"):
    sample, eps_uncond, eps_cond, noise = make_cfg_inputs(shape, dtype, device)
    kwargs = dict(prediction_type=prediction_type, clip_sample_range=clip, eta=eta, noise=noise if eta > 0 else None)
    x_prev, x0 = cfg_ddim.cfg_ddim_step_triton(sample, eps_uncond, eps_cond, 7.5, *alphas, **kwargs)
    # The kernel's contract: the float32 result, rounded once to the input dtype.
    kwargs["noise"] = kwargs["noise"].float() if eta > 0 else None
    ref_prev, ref_x0 = cfg_ddim.cfg_ddim_step_reference(sample.float(), eps_uncond.float(), eps_cond.float(), 7.5, *alphas, **kwargs)
    assert x_prev.dtype == x0.dtype == dtype and x_prev.shape == shape
    assert_close(x_prev, ref_prev.to(dtype))
    assert_close(x0, ref_x0.to(dtype))


# --- classifier-free guidance + DDIM ---------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("alphas", ALPHA_PAIRS)
def test_cfg_reference_is_ddim_step_on_combined_output(prediction_type, clip, eta, alphas):
    sample, eps_uncond, eps_cond, noise = make_cfg_inputs((2, 4, 8, 8), torch.float64)
    combined = eps_uncond + 3.0 * (eps_cond - eps_uncond)
    expected = ddim.ddim_step(sample, combined, *alphas, prediction_type=prediction_type, clip_sample_range=clip, eta=eta, noise=noise)
    actual = cfg_ddim.cfg_ddim_step_reference(
        sample, eps_uncond, eps_cond, 3.0, *alphas, prediction_type=prediction_type, clip_sample_range=clip, eta=eta, noise=noise
    )
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.8])
@pytest.mark.parametrize("step_index", [10, 49])
def test_cfg_reference_matches_diffusers_ddim_scheduler(prediction_type, clip_sample, eta, step_index):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=clip_sample,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )  # fmt: skip
    scheduler.set_timesteps(50)
    t = int(scheduler.timesteps[step_index])
    prev_t = t - scheduler.config.num_train_timesteps // 50
    alpha_bar = float(scheduler.alphas_cumprod[t])
    alpha_bar_prev = float(scheduler.alphas_cumprod[prev_t]) if prev_t >= 0 else float(scheduler.final_alpha_cumprod)
    sample, eps_uncond, eps_cond, noise = make_cfg_inputs((1, 4, 16, 16), torch.float32, seed=step_index)

    x_prev, x0 = cfg_ddim.cfg_ddim_step_reference(
        sample, eps_uncond, eps_cond, 7.5, alpha_bar, alpha_bar_prev, prediction_type=prediction_type,
        clip_sample_range=1.0 if clip_sample else None, eta=eta, noise=noise,
    )  # fmt: skip
    combined = eps_uncond + 7.5 * (eps_cond - eps_uncond)
    out = scheduler.step(combined, t, sample, eta=eta, variance_noise=noise if eta > 0 else None)
    torch.testing.assert_close(x_prev, out.prev_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0, out.pred_original_sample, rtol=1e-5, atol=1e-5)


def test_cfg_rejects_mismatched_shapes_and_missing_noise():
    pytest.importorskip("triton")
    sample, eps_uncond, eps_cond, _ = make_cfg_inputs((1, 4, 8, 8), torch.float32)
    with pytest.raises(ValueError, match="eps_cond has shape"):
        cfg_ddim.cfg_ddim_step_triton(sample, eps_uncond, eps_cond[:, :3], 7.5, 0.5, 0.6)
    with pytest.raises(ValueError, match="needs `noise`"):
        cfg_ddim.cfg_ddim_step_triton(sample, eps_uncond, eps_cond, 7.5, 0.5, 0.6, eta=1.0)
    # From a review: mixed dtypes computed one way in the kernel and another in the reference (5e-3 apart).
    with pytest.raises(ValueError, match=r"eps_cond is torch.float16; expected torch.float32 like sample \(cast it first\)"):
        cfg_ddim.cfg_ddim_step_triton(sample, eps_uncond, eps_cond.half(), 7.5, 0.5, 0.6)


def _zero_snr_step_paths():
    paths = [pytest.param(cfg_ddim.cfg_ddim_step_reference, id="reference")]
    if launch.triton_available():
        paths.append(pytest.param(cfg_ddim.cfg_ddim_step_triton, id="triton"))
    return paths


@pytest.mark.parametrize("step", _zero_snr_step_paths())
def test_deterministic_ddim_inversion_step_is_finite(step):
    """From the kernels review: a step toward more noise (alpha_bar > alpha_bar_prev, as DDIM inversion takes) at
    eta 0 gave NaN on both paths (0 * sqrt of a negative variance); it is x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev)
    eps, the deterministic update, whichever way alpha_bar moves."""
    sample, eps_uncond, eps_cond, _ = make_cfg_inputs((1, 4, 8, 8), torch.float32)
    alpha_bar, alpha_bar_prev = 0.9, 0.5
    x_prev, x0 = step(sample, eps_uncond, eps_cond, 7.5, alpha_bar, alpha_bar_prev)
    eps = eps_uncond + 7.5 * (eps_cond - eps_uncond)
    torch.testing.assert_close(x0, (sample - 0.1**0.5 * eps) / 0.9**0.5)
    torch.testing.assert_close(x_prev, 0.5**0.5 * x0 + 0.5**0.5 * eps)


@pytest.mark.parametrize("step", _zero_snr_step_paths())
def test_ddim_eta_1_on_a_zero_terminal_snr_schedule_is_finite_and_matches_diffusers_after_step_0(step):
    """From the samplers review: SD-2-style sampling (v-prediction, zero terminal SNR, trailing) at eta 1. The first
    step's direction variance 1 - ab_prev - sigma^2 is 0 exactly (alpha_bar 0) and rounds to -6e-8: the reference
    returned NaN (diffusers does too) and the kernel raised. Step 0 is checked against its closed form (x0 = -v at
    alpha_bar 0, so x_prev = -sqrt(ab_prev) v + sqrt(1 - ab_prev) z); steps 1-49 against diffusers' DDIMScheduler."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False, clip_sample=False,
                              prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    schedule = ddim.make_schedule(ddim.DDIMConfig(**{k: v for k, v in scheduler.config.items() if not k.startswith("_")
                                                     and k in ddim.DDIMConfig.__dataclass_fields__}), 50)
    scheduler.set_timesteps(50)
    assert schedule.timesteps.tolist() == scheduler.timesteps.tolist() and float(schedule.alpha_bar[0]) == 0.0
    gen = torch.Generator().manual_seed(3)
    x = torch.randn((1, 4, 8, 8), generator=gen)

    def model(x):  # a fixed, smooth stand-in for the UNet's two CFG branches
        return 0.3 * x.tanh(), 0.3 * x.tanh() + 0.05 * x

    for i, t in enumerate(scheduler.timesteps):
        uncond, cond = model(x)
        noise = torch.randn(x.shape, generator=gen)
        got, _ = step(x, uncond, cond, 4.0, float(schedule.alpha_bar[i]), float(schedule.alpha_bar_prev[i]),
                      prediction_type="v_prediction", eta=1.0, noise=noise)
        assert torch.isfinite(got).all(), f"step {i}"
        v = uncond + 4.0 * (cond - uncond)
        if i == 0:
            ab_prev = schedule.alpha_bar_prev[0].double()
            want = (-ab_prev.sqrt() * v.double() + (1 - ab_prev).sqrt() * noise.double()).float()
        else:
            want = scheduler.step(v, t, x, eta=1.0, variance_noise=noise).prev_sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"step {i}")
        x = got


@pytest.mark.parametrize("step", _zero_snr_step_paths())
@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan")])
def test_both_ddim_step_paths_refuse_eta_outside_0_1_in_one_line(step, eta):
    """eta above 1 makes sigma^2 exceed 1 - ab_prev: the reference returned NaN and the kernel a bare ValueError."""
    sample, eps_uncond, eps_cond, noise = make_cfg_inputs((1, 4, 8, 8), torch.float32)
    with pytest.raises(DiffrtError, match=r"^eta .* is outside \[0, 1\].*use eta between 0"):
        step(sample, eps_uncond, eps_cond, 7.5, 0.5, 0.6, eta=eta, noise=noise)


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("alphas", ALPHA_PAIRS)
def test_cfg_kernel_takes_sample_prediction_against_a_float64_oracle(clip, eta, alphas):
    """prediction_type "sample" (the model predicts x0) goes through the kernel too. A review found it untested; at
    alpha_bar near 1, eps = (x - sqrt(ab) x0) / sqrt(1 - ab) cancels, and the fp32 reference is the less accurate side
    (5e-5 off float64, the kernel 5e-7): the oracle is the reference in float64."""
    pytest.importorskip("triton")
    sample, eps_uncond, eps_cond, noise = make_cfg_inputs((2, 3, 16, 16), torch.float32)
    kwargs = dict(prediction_type="sample", clip_sample_range=clip, eta=eta)
    x_prev, x0 = cfg_ddim.cfg_ddim_step_triton(sample, eps_uncond, eps_cond, 7.5, *alphas, noise=noise if eta > 0 else None, **kwargs)
    ref_prev, ref_x0 = cfg_ddim.cfg_ddim_step_reference(sample.double(), eps_uncond.double(), eps_cond.double(), 7.5, *alphas,
                                                        noise=noise.double() if eta > 0 else None, **kwargs)
    torch.testing.assert_close(x_prev.double(), ref_prev, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0.double(), ref_x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("alphas", ALPHA_PAIRS)
def test_cfg_kernel_matches_reference_interpreted(shape, dtype, prediction_type, clip, eta, alphas):
    pytest.importorskip("triton")
    check_cfg_parity(shape, dtype, alphas, prediction_type, clip, eta)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_cfg_kernel_takes_the_zero_snr_step_of_a_v_prediction_model(eta):
    """The bug: rescale_betas_zero_snr with trailing spacing starts at alpha_bar 0, where v-prediction is defined
    (x0 = -v, eps = x_t), and the fused kernel refused it, so such a model crashed at step 0 on CUDA with CFG."""
    pytest.importorskip("triton")
    check_cfg_parity((2, 4, 8, 8), torch.float32, (0.0, 0.047), "v_prediction", None, eta)
    with pytest.raises(ValueError, match="epsilon prediction divides by zero at alpha_bar 0.0"):
        cfg_ddim.prediction_coefficients(0.0, "epsilon")


# --- colour guidance --------------------------------------------------------------------------


def make_color_inputs(shape, dtype, per_image, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, model_output = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    target = torch.rand((shape[0], shape[1]) if per_image else (shape[1],), generator=gen)
    # Scale so that each element moves by 0.05 * dx0/dx: visible in bf16, small next to x.
    scale = 0.1 * shape[1] * shape[2] * shape[3]
    return x.to(device, dtype), model_output.to(device, dtype), target.to(device), scale


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (3, 3, 17, 13)], ids=str)
@pytest.mark.parametrize("alpha_bar", [0.0058, 0.9983])
def test_color_reference_matches_autograd_of_color_loss(prediction_type, per_image, shape, alpha_bar):
    x, model_output, target, scale = make_color_inputs(shape, torch.float32, per_image)
    x_guided, x0 = color_guidance.color_guidance_step_reference(x, model_output, alpha_bar, target, scale, prediction_type=prediction_type)

    x_leaf = x.clone().requires_grad_(True)
    x0_autograd, _ = ddim.predict_x0(x_leaf, model_output, alpha_bar, prediction_type)
    loss = guidance.color_loss(x0_autograd / 2 + 0.5, target)
    (grad,) = torch.autograd.grad(loss, x_leaf)
    torch.testing.assert_close(x_guided, x - scale * grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x0, x0_autograd.detach(), rtol=1e-6, atol=1e-6)
    assert not torch.equal(x_guided, x)


@pytest.mark.parametrize("implementation", ["reference", "triton"])
def test_color_sign_of_zero_is_zero_like_autograd(implementation):
    if implementation == "triton":
        pytest.importorskip("triton")
    step = getattr(color_guidance, f"color_guidance_step_{implementation}")
    x = torch.zeros(1, 3, 2, 2)  # with eps = 0, x0 = 0 and img = 0.5 exactly: every pixel on target
    x_guided, _ = step(x, torch.zeros_like(x), 0.5, torch.full((3,), 0.5), 10.0)
    assert torch.equal(x_guided, x)


def test_color_rejects_sample_prediction_and_bad_target():
    x, model_output, target, scale = make_color_inputs((2, 3, 8, 8), torch.float32, per_image=True)
    with pytest.raises(ValueError, match="prediction_type"):
        color_guidance.color_guidance_step(x, model_output, 0.5, target, scale, prediction_type="sample")
    with pytest.raises(ValueError, match="target has shape"):
        color_guidance.color_guidance_step(x, model_output, 0.5, torch.rand(4), scale)


def check_color_parity(shape, dtype, prediction_type, per_image, device="cpu"):
    x, model_output, target, scale = make_color_inputs(shape, dtype, per_image, device)
    alpha_bar = 0.3
    x_guided, x0 = color_guidance.color_guidance_step_triton(x, model_output, alpha_bar, target, scale, prediction_type=prediction_type)
    ref_guided, ref_x0 = color_guidance.color_guidance_step_reference(x, model_output, alpha_bar, target, scale, prediction_type=prediction_type)
    assert x_guided.dtype == x0.dtype == dtype
    assert_close(x0, ref_x0)
    # sign() jumps where img meets its target, and kernel and reference may round x0 a hair apart
    # there; judge only the pixels clearly off target (nearly all of them).
    image = ref_x0.float() / 2 + 0.5
    cols = target.reshape(-1, shape[1], 1, 1).expand(shape[0], -1, -1, -1)
    clear = (image - cols).abs() > 1e-3
    assert clear.float().mean() > 0.99
    assert_close(x_guided[clear], ref_guided[clear])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("per_image", [False, True])
def test_color_kernel_matches_reference_interpreted(shape, dtype, prediction_type, per_image):
    pytest.importorskip("triton")
    check_color_parity(shape, dtype, prediction_type, per_image)


# --- dispatch and packaging -------------------------------------------------------------------


def test_dispatch_uses_reference_on_cpu_and_kernel_when_interpreter_is_asked(monkeypatch):
    pytest.importorskip("triton")
    calls = []
    monkeypatch.setattr(cfg_ddim, "cfg_ddim_step_triton", lambda *a, **k: calls.append("cfg") or (None, None))
    monkeypatch.setattr(color_guidance, "color_guidance_step_triton", lambda *a, **k: calls.append("color") or (None, None))
    sample, eps_uncond, eps_cond, _ = make_cfg_inputs((1, 3, 4, 4), torch.float32)
    for name in launch.INTERPRET_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    cfg_ddim.cfg_ddim_step(sample, eps_uncond, eps_cond, 7.5, 0.5, 0.6)
    color_guidance.color_guidance_step(sample, eps_uncond, 0.5, torch.rand(3), 1.0)
    assert calls == []
    monkeypatch.setenv("DIFFRT_TRITON_INTERPRET", "1")
    cfg_ddim.cfg_ddim_step(sample, eps_uncond, eps_cond, 7.5, 0.5, 0.6)
    color_guidance.color_guidance_step(sample, eps_uncond, 0.5, torch.rand(3), 1.0)
    assert calls == ["cfg", "color"]


def test_dispatch_keeps_autograd_on_the_reference(monkeypatch):
    """The kernels have no backward: a sample that needs its gradient takes the reference, whose result has one."""
    pytest.importorskip("triton")
    monkeypatch.setenv("DIFFRT_TRITON_INTERPRET", "1")  # the kernel's branch, as on CUDA
    sample, eps_uncond, eps_cond, _ = make_cfg_inputs((1, 3, 4, 4), torch.float32)
    sample.requires_grad_(True)
    x_prev, _ = cfg_ddim.cfg_ddim_step(sample, eps_uncond, eps_cond, 7.5, 0.5, 0.6)
    x_guided, _ = color_guidance.color_guidance_step(eps_uncond, sample, 0.5, torch.rand(3), 1.0)  # through the output
    (x_prev.sum() + x_guided.sum()).backward()
    assert sample.grad is not None and sample.grad.abs().sum() > 0
    with torch.no_grad():  # no graph wanted: the kernel runs
        assert launch.should_use_triton(sample, eps_uncond)


def test_jit_kernel_leaves_the_environment_alone(monkeypatch):
    """Building a kernel in either mode reads and writes no environment variable: switching TRITON_INTERPRET around
    the decoration raced between threads (one could get a compiled kernel for CPU tensors, and the variable stayed)."""
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    writes = []

    class Watched(dict):
        def __setitem__(self, key, value):
            writes.append(key)
            super().__setitem__(key, value)

        def __delitem__(self, key):
            writes.append(key)
            super().__delitem__(key)

    monkeypatch.setattr(os, "environ", Watched(os.environ))
    build = launch.jit_kernel.__wrapped__  # past the cache, so the kernel is built here
    assert isinstance(build(cfg_ddim._cfg_ddim_kernel, interpret=True), InterpretedFunction)
    assert isinstance(build(cfg_ddim._cfg_ddim_kernel, interpret=False), JITFunction)
    assert writes == []


def test_package_imports_and_falls_back_without_triton():
    # A None entry in sys.modules makes `import triton` raise ImportError, as if it were not installed; the kernels'
    # entry points then return what their PyTorch references return.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from diffrt.kernels import cfg_ddim_step, color_guidance_step, triton_available\n"
        "assert not triton_available()\n"
        "from diffrt.kernels.cfg_ddim import cfg_ddim_step_reference\n"
        "from diffrt.kernels.color_guidance import color_guidance_step_reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, u, c = (torch.randn(1, 3, 4, 4, generator=g) for _ in range(3))\n"
        "target = torch.rand(3, generator=g)\n"
        "pairs = [*zip(cfg_ddim_step(x, u, c, 7.5, 0.5, 0.6), cfg_ddim_step_reference(x, u, c, 7.5, 0.5, 0.6)),\n"
        "         *zip(color_guidance_step(x, u, 0.5, target, 1.0), color_guidance_step_reference(x, u, 0.5, target, 1.0))]\n"
        "assert len(pairs) == 4 and all(torch.equal(got, want) for got, want in pairs)  # the references' own results\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "DIFFRT_TRITON_INTERPRET": "1"})


def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter does not type-check like the compiler; build real sm_90 cubins on the CPU."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cases = [
        (cfg_ddim._cfg_ddim_kernel, ["*fp16"] * 6 + ["i32"] + ["fp32"] * 9, {"HAS_NOISE": True, "CLIP": True}),
        (color_guidance._color_guidance_kernel, ["*bf16", "*bf16", "*fp32", "*bf16", "*bf16", "i32", "i32"] + ["fp32"] * 3, {}),
    ]
    for body, types, flags in cases:
        kernel = launch.jit_kernel(body, interpret=False)
        constexprs = {**flags, "BLOCK_SIZE": launch.BLOCK_SIZE}
        assert len(types) + len(constexprs) == len(kernel.arg_names)  # zip would silently mistype the flags
        signature = dict(zip(kernel.arg_names, types + ["constexpr"] * len(constexprs)))
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32), options=launch.LAUNCH_OPTIONS)
        assert compiled.asm["cubin"]
        # Every address is taken at a 64-bit offset: in int32 the offsets past 2**31 elements (24 GiB of fp16 in a
        # CFG step, within one GPU) wrap negative and read and write before the buffers.
        addresses = [line for line in compiled.asm["ttir"].splitlines() if "tt.addptr" in line]
        assert len(addresses) >= 4 and all(line.split("loc(")[0].rstrip().endswith("xi64>") for line in addresses), addresses


# --- compiled kernels on CUDA -----------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_kernels_match_reference_on_cuda(dtype, prediction_type):
    pytest.importorskip("triton")
    for shape in [(1, 4, 64, 64), (3, 3, 17, 13)]:
        for clip, eta in [(None, 0.0), (1.0, 0.5)]:
            check_cfg_parity(shape, dtype, ALPHA_PAIRS[0], prediction_type, clip, eta, device="cuda")
        check_color_parity(shape, dtype, prediction_type, per_image=True, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_launch_on_the_tensors_gpu_not_the_current_one():
    """Triton launches on the current device; the wrappers make the tensors' device current."""
    pytest.importorskip("triton")
    with torch.cuda.device(0):
        check_cfg_parity((2, 4, 64, 64), torch.float16, ALPHA_PAIRS[0], "epsilon", 1.0, 0.5, device="cuda:1")
        check_color_parity((2, 4, 64, 64), torch.float16, "epsilon", per_image=True, device="cuda:1")
        torch.cuda.synchronize(1)


@pytest.mark.gpu
@needs_cuda
def test_kernels_take_non_contiguous_inputs_on_cuda():
    """Channels-last latents and a view of a stacked CFG batch go in as they come from a UNet."""
    pytest.importorskip("triton")
    sample, eps_uncond, eps_cond, _ = make_cfg_inputs((2, 4, 32, 32), torch.float16, "cuda")
    pair = torch.stack([eps_uncond, eps_cond], dim=-1)  # strided views of one buffer
    args = (sample.to(memory_format=torch.channels_last), pair[..., 0], pair[..., 1], 7.5, *ALPHA_PAIRS[0])
    expected = cfg_ddim.cfg_ddim_step_reference(*(a.float() if torch.is_tensor(a) else a for a in args))
    for actual, ref in zip(cfg_ddim.cfg_ddim_step_triton(*args), expected):
        assert_close(actual, ref.to(torch.float16))


@pytest.mark.gpu
@needs_cuda
def test_dispatch_uses_compiled_kernel_on_cuda(monkeypatch):
    pytest.importorskip("triton")
    for name in launch.INTERPRET_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    called = []
    kernel = cfg_ddim.cfg_ddim_step_triton
    monkeypatch.setattr(cfg_ddim, "cfg_ddim_step_triton", lambda *a, **k: called.append(1) or kernel(*a, **k))
    sample, eps_uncond, eps_cond, _ = make_cfg_inputs((1, 4, 64, 64), torch.float16, "cuda")
    cfg_ddim.cfg_ddim_step(sample, eps_uncond, eps_cond, 7.5, 0.5, 0.6)
    assert called == [1]
