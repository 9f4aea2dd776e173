"""LoRA reading and fusing (RELIABILITY rows 7, 8, 12), checked against diffusers itself.

diffusers is the oracle: `load_lora_weights` + `set_adapters` + `fuse_lora` on the tiny
pipeline must give the same weights as `diffrt.export.lora_fuse.fuse_loras` on the same files, DoRA
and lora_B.bias included (but for the text encoder's DoRA magnitudes, which diffusers leaves
unloaded: the reference is given them by hand, see the DoRA section).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from diffrt.atomic import save_safetensors, sha256_file
from diffrt.errors import LoraError
from diffrt.export.lora import LoraSpec, read_lora, read_loras
from diffrt.export.lora_fuse import fuse_loras, fused_params
from diffrt.tiny import tiny_lora_files, tiny_text_to_image

COMPONENTS = ("unet", "text_encoder")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return tiny_text_to_image(tmp_path_factory.mktemp("tiny_sd"), seed=0, controlnet=True)


@pytest.fixture(scope="module")
def lora_a(sd_folder, tmp_path_factory) -> dict[str, Path]:
    return tiny_lora_files(sd_folder, tmp_path_factory.mktemp("lora_a"), seed=1)


@pytest.fixture(scope="module")
def lora_b(sd_folder, tmp_path_factory) -> dict[str, Path]:
    return tiny_lora_files(sd_folder, tmp_path_factory.mktemp("lora_b"), seed=2)


def load_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_components(folder) -> dict[str, torch.nn.Module]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return {
        "unet": UNet2DConditionModel.from_pretrained(folder / "unet"),
        "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder"),
    }


def diffusers_fused(folder, loras: list[tuple[Path, float]]) -> dict[str, dict[str, torch.Tensor]]:
    """What diffusers makes of the files: load each as an adapter, weight them, fuse, unload."""
    pipe = load_pipeline(folder)
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(path, adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, drops the peft wrappers
    return {c: getattr(pipe, c).state_dict() for c in COMPONENTS}


def diffrt_fused(folder, loras: list[tuple[Path, float]]):
    components = load_components(folder)
    report = fuse_loras(components, [(read_lora(path), scale) for path, scale in loras])
    return {c: m.state_dict() for c, m in components.items()}, report


def base_state(folder) -> dict[str, dict[str, torch.Tensor]]:
    return {c: m.state_dict() for c, m in load_components(folder).items()}


def fused_state(base: dict, loras) -> dict[str, dict[str, torch.Tensor]]:
    """What refit sets on an engine: every weight, the LoRAs fused into the base (fused_params) where they
    patch it, else the base, cast to the base's dtypes."""
    fused = fused_params(base, loras)
    return {c: {**s, **{k: v.to(s[k].dtype) for k, v in fused.get(c, {}).items()}} for c, s in base.items()}


def assert_states_close(actual, expected, atol=1e-6):
    for component in COMPONENTS:
        assert actual[component].keys() == expected[component].keys()
        for name, value in expected[component].items():
            torch.testing.assert_close(actual[component][name], value, atol=atol, rtol=0, msg=f"{component}.{name}")


def changed_params(state, base) -> set[str]:
    return {f"{c}.{k}" for c in COMPONENTS for k, v in state[c].items() if not torch.equal(v, base[c][k])}


def generate(pipe, **kwargs) -> torch.Tensor:
    return pipe(
        "a photo of the cat", num_inference_steps=2, height=32, width=32, output_type="pt",
        generator=torch.Generator().manual_seed(0), **kwargs,
    ).images


# --- the tiny pipeline and its fixtures, judged by diffusers ---------------------------------


def test_tiny_pipeline_generates(sd_folder):
    pipe = load_pipeline(sd_folder)
    image = generate(pipe)
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    assert torch.equal(image, generate(pipe))  # seeded: deterministic
    assert pipe.vae_scale_factor == 8 and pipe.tokenizer.model_max_length == 77
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)


def test_tiny_controlnet_changes_output(sd_folder):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    controlnet = ControlNetModel.from_pretrained(sd_folder / "controlnet")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(sd_folder, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    cond = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    on = generate(pipe, image=cond)
    off = generate(pipe, image=cond, controlnet_conditioning_scale=0.0)
    other = generate(pipe, image=1 - cond)
    assert torch.equal(off, generate(load_pipeline(sd_folder)))  # scale 0 is the plain pipeline
    assert (on - off).abs().max() > 1e-3 and (on - other).abs().max() > 1e-3


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_lora_fixture_changes_diffusers_output(sd_folder, lora_a, fmt):
    pipe = load_pipeline(sd_folder)
    base = generate(pipe)
    pipe.load_lora_weights(lora_a[fmt], adapter_name="a")
    with_lora = generate(pipe)
    at_zero = generate(pipe, cross_attention_kwargs={"scale": 0.0})
    assert (with_lora - base).abs().max() > 1e-3
    torch.testing.assert_close(at_zero, base, atol=1e-5, rtol=0)


# --- fusing equals diffusers ------------------------------------------------------------------


@pytest.mark.parametrize("fmt, scale", [("peft", 0.7), ("kohya", 1.0)])
def test_fuse_matches_diffusers(sd_folder, lora_a, fmt, scale):
    lora = read_lora(lora_a[fmt])
    assert lora.format == fmt
    ours, report = diffrt_fused(sd_folder, [(lora_a[fmt], scale)])
    assert_states_close(ours, diffusers_fused(sd_folder, [(lora_a[fmt], scale)]))

    # Every layer of the file was applied (no unmatched keys) and every patched weight moved.
    (fused,) = report.loras
    assert fused.num_modules == len(lora.layers) > 0
    assert set(fused.modules) == set(COMPONENTS)
    assert fused.sha256 == sha256_file(lora_a[fmt]) and fused.scale == scale
    patched = {f"{c}.{m}.weight" for c, names in fused.modules.items() for m in names}
    assert changed_params(ours, base_state(sd_folder)) == patched


def test_diffusers_naming_is_read_in_full(sd_folder, lora_a):
    """The "diffusers" fixture holds the peft fixture's adapter in diffusers' training-script
    naming (`to_q.lora.down` for attention, `proj_in.lora_A` elsewhere), without the LoraConfig,
    so alpha = rank instead of 8/4. Fused at scale 1 it must equal the peft file at scale 0.5.
    (diffusers itself drops the 32 attention modules of this mixed file with only a warning:
    the silent mismatch of RELIABILITY row 7.)"""
    lora = read_lora(lora_a["diffusers"])
    assert lora.format == "diffusers" and all(layer.alpha is None for layer in lora.layers)
    ours, report = diffrt_fused(sd_folder, [(lora_a["diffusers"], 1.0)])
    assert report.loras[0].num_modules == len(read_lora(lora_a["peft"]).layers)
    assert_states_close(ours, diffusers_fused(sd_folder, [(lora_a["peft"], 0.5)]))


def test_two_loras_at_different_scales_match_diffusers(sd_folder, lora_a, lora_b):
    loras = [(lora_a["peft"], 0.8), (lora_b["kohya"], -0.5)]
    ours, report = diffrt_fused(sd_folder, loras)
    assert_states_close(ours, diffusers_fused(sd_folder, loras))
    assert [f.scale for f in report.loras] == [0.8, -0.5]


def test_fp16_weights_fuse_in_fp32_and_cast_back(sd_folder, lora_a):
    """fp16 weights are fused as (W16 in fp32 + delta in fp32), rounded to fp16 once. The oracle is independent of
    the fp16 path: delta is taken from the fp32 fusion (checked against diffusers elsewhere) as fused32 - W32. A
    review showed the earlier form compared the fusion code with itself: fusing in fp16 arithmetic passed it, while
    it changes ~3 % of the fp16 weights by an ulp or more."""
    lora = read_lora(lora_a["kohya"])
    base32 = {c: m.state_dict() for c, m in load_components(sd_folder).items()}
    fp32 = load_components(sd_folder)
    fp16 = {c: m.to(torch.float16) for c, m in load_components(sd_folder).items()}
    fuse_loras(fp32, [(lora, 1.0)])
    fuse_loras(fp16, [(lora, 1.0)])
    changed = total = 0
    for component in fp16:
        state, ref = fp16[component].state_dict(), fp32[component].state_dict()
        for name, fused32 in ref.items():
            delta = fused32 - base32[component][name]
            if not delta.any():
                continue
            expected = (base32[component][name].half().float() + delta).half()
            assert state[name].dtype == torch.float16
            # Rounding fused32 - W32 can move a value that sits on a rounding boundary of fp16: one ulp, rarely.
            off = state[name] != expected
            ulp = (expected.float().abs().clamp_min(2.0**-14) * 2.0**-10)
            assert ((state[name].float() - expected.float()).abs()[off] <= ulp[off] * 1.01).all(), name
            changed, total = changed + int(off.sum()), total + off.numel()
    assert total > 0 and changed / total < 1e-3, (changed, total)


def test_kohya_text_model_prefix_resolves(sd_folder, lora_a, tmp_path):
    """Published SD 1.x LoRAs name `lora_te_text_model_encoder_...`; transformers 5's CLIPTextModel
    has no `text_model` level. The name is still found (diffusers strips the prefix too)."""
    from safetensors.torch import load_file

    renamed = {k.replace("lora_te_", "lora_te_text_model_"): v for k, v in load_file(lora_a["kohya"]).items()}
    save_safetensors(tmp_path / "te_prefix.safetensors", renamed)
    ours, _ = diffrt_fused(sd_folder, [(tmp_path / "te_prefix.safetensors", 1.0)])
    expected, _ = diffrt_fused(sd_folder, [(lora_a["kohya"], 1.0)])
    assert_states_close(ours, expected, atol=0)


def test_unprefixed_adapter_metadata_sets_the_scaling(sd_folder, tmp_path):
    """One model's `save_lora_adapter` writes unprefixed keys and an unprefixed LoraConfig (r 4,
    lora_alpha 8, patterns). Its scalings must be used, as diffusers' `load_lora_adapter` does, not
    dropped for alpha = rank. (diffusers reads the file's metadata only with use_safetensors=True.)"""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from diffrt.tiny import _randomise_lora

    unet = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "proj_in", "conv1"], init_lora_weights="gaussian",
                        rank_pattern={"proj_in": 2}, alpha_pattern={"to_k": 1})
    unet.add_adapter(config, adapter_name="a")
    _randomise_lora(unet, torch.Generator().manual_seed(3), std_b=0.05)
    unet.save_lora_adapter(tmp_path, adapter_name="a")
    path = tmp_path / "pytorch_lora_weights.safetensors"

    expected = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    expected.load_lora_adapter(str(path), prefix=None, adapter_name="a", use_safetensors=True)
    expected.fuse_lora(lora_scale=0.7)
    expected.unload_lora()
    ours = {"unet": load_components(sd_folder)["unet"]}
    fuse_loras(ours, [(read_lora(path), 0.7)])
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(ours["unet"].state_dict()[name], value, atol=1e-6, rtol=0, msg=name)


def test_overlapping_alpha_patterns_with_different_alphas_are_warned_of(sd_folder, tmp_path, caplog):
    """peft took the first of several matching alpha_pattern keys in its LoraConfig's order; diffusers saves them
    sorted, so attn1.to_q trained at alpha 9 ("to_q" first) reads back at 1 ("attn1.to_q" sorts first), in diffusers
    and diffrt alike. The file cannot tell which order was trained: say so, once, where the alphas differ."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from diffrt.tiny import _randomise_lora

    def saved(alpha_pattern: dict, folder: Path) -> Path:
        unet = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"], init_lora_weights="gaussian",
                                    alpha_pattern=alpha_pattern), adapter_name="a")
        _randomise_lora(unet, torch.Generator().manual_seed(3), std_b=0.05)
        unet.save_lora_adapter(folder, adapter_name="a")
        return folder / "pytorch_lora_weights.safetensors"

    same, differ = saved({"to_q": 9, "attn1.to_q": 9}, tmp_path / "same"), saved({"to_q": 9, "attn1.to_q": 1}, tmp_path / "differ")
    warned = lambda: [r.getMessage() for r in caplog.records if r.name == "diffrt.export.lora"]  # noqa: E731
    with caplog.at_level("WARNING", logger="diffrt.export.lora"):
        read_lora(same)  # overlapping, with one alpha: nothing to say
        assert warned() == []
        lora = read_lora(differ)
    assert len(warned()) == 1 and "several alpha_pattern keys match" in warned()[0]
    assert {layer.alpha for layer in lora.layers if ".attn1." in layer.module} == {1.0}  # diffusers' reading


# --- unmatched keys are errors, never no-ops (row 7) ------------------------------------------


def _kohya_layer(name: str, rank=2, width=32) -> dict[str, torch.Tensor]:
    return {
        f"{name}.lora_down.weight": torch.ones(rank, width),
        f"{name}.lora_up.weight": torch.ones(width, rank),
        f"{name}.alpha": torch.tensor(1.0),
    }


def test_lora_matching_nothing_is_an_error(sd_folder, tmp_path):
    state = {}
    for i in range(3):
        state |= _kohya_layer(f"lora_unet_input_blocks_{i}_1_proj_in")
    save_safetensors(tmp_path / "ldm_names.safetensors", state)
    components = load_components(sd_folder)
    before = {c: m.state_dict() for c, m in components.items()}
    with pytest.raises(LoraError, match=r"none of its 3 LoRA modules.*lora_unet_input_blocks_0_1_proj_in\.lora_down\.weight"):
        fuse_loras(components, [(read_lora(tmp_path / "ldm_names.safetensors"), 1.0)])
    assert not changed_params({c: m.state_dict() for c, m in components.items()}, before)


def test_partly_unmatched_lora_lists_the_keys_and_changes_nothing(sd_folder, lora_a, tmp_path):
    from safetensors.torch import load_file

    state = load_file(lora_a["kohya"])
    for i in range(7):
        state |= _kohya_layer(f"lora_unet_down_blocks_9_attentions_{i}_proj_in")
    save_safetensors(tmp_path / "partial.safetensors", state)
    lora = read_lora(tmp_path / "partial.safetensors")
    components = load_components(sd_folder)
    before = {c: m.state_dict() for c, m in components.items()}
    with pytest.raises(LoraError) as error:
        fuse_loras(components, [(lora, 1.0)])
    message = str(error.value)
    assert f"7 of its {len(lora.layers)} LoRA modules match no" in message and "and 2 more" in message
    assert message.count("lora_unet_down_blocks_9_attentions_") == 5 and "\n" not in message
    assert not changed_params({c: m.state_dict() for c, m in components.items()}, before)


def test_lora_for_a_component_not_given_is_an_error(sd_folder, lora_a):
    unet_only = {"unet": load_components(sd_folder)["unet"]}
    with pytest.raises(LoraError, match="text_encoder weights but only unet were given"):
        fuse_loras(unet_only, [(read_lora(lora_a["peft"]), 1.0)])


@pytest.mark.parametrize("suffix, shape, kind", [("dora_scale", (1, 32), "DoRA"), ("lora_mid.weight", (2, 2, 3, 3), "Tucker")])
def test_unsupported_keys_are_named(tmp_path, suffix, shape, kind):
    state = _kohya_layer("lora_unet_conv_in") | {f"lora_unet_conv_in.{suffix}": torch.ones(shape)}
    save_safetensors(tmp_path / "lycoris.safetensors", state)
    with pytest.raises(LoraError, match=f"{kind}.*lora_unet_conv_in.{suffix}"):
        read_lora(tmp_path / "lycoris.safetensors")


_TO_Q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def test_two_namings_of_one_module_are_an_error(tmp_path):
    """`to_q.lora_A` and `to_q.lora.down` both name the down weight of to_q: keeping either would
    drop the other's keys without a word."""
    state = {f"{_TO_Q}.lora_A.weight": torch.ones(2, 64), f"{_TO_Q}.lora_B.weight": torch.ones(64, 2),
             f"{_TO_Q}.lora.down.weight": torch.ones(2, 64), f"{_TO_Q}.lora.up.weight": torch.ones(64, 2)}
    save_safetensors(tmp_path / "twice.safetensors", state)
    with pytest.raises(LoraError, match=r"to_q\.lora\.down\.weight and .*to_q\.lora_A\.weight are both the down weight"):
        read_lora(tmp_path / "twice.safetensors")


@pytest.mark.parametrize("state, message", [
    (_kohya_layer("lora_unet_conv_in") | {"lora_unet_conv_in.alpha": torch.tensor(0.0, dtype=torch.float16)},
     r"lora_unet_conv_in\.alpha gives alpha 0"),
    ({f"{_TO_Q}.lora_A.weight": torch.ones(2, 64), f"{_TO_Q}.lora_B.weight": torch.zeros(64, 2)}, "every LoRA update in it is zero"),
], ids=["alpha-0", "untrained"])
def test_lora_that_changes_nothing_is_an_error(tmp_path, state, message):
    """alpha 0 (diffusers fuses it as no change, sd-scripts as alpha = rank) and an adapter whose
    every lora_B is still peft's zero init would both be silent no-ops."""
    save_safetensors(tmp_path / "noop.safetensors", state)
    with pytest.raises(LoraError, match=message):
        read_lora(tmp_path / "noop.safetensors")


@pytest.mark.parametrize("state, message", [
    (_kohya_layer("lora_unet_conv_in") | {"lora_unet_conv_in.alpha": torch.tensor(float("nan"))},
     r"lora_unet_conv_in\.alpha holds NaN or infinite values; the file is damaged"),
    (_kohya_layer("lora_unet_conv_in") | {"lora_unet_conv_in.lora_up.weight": torch.full((32, 2), 70000.0).half()},
     r"lora_unet_conv_in\.lora_up\.weight holds NaN or infinite values"),  # an fp16 save that overflowed
    (_kohya_layer("lora_unet_conv_in") | {"lora_unet_conv_in.alpha": torch.tensor([1.0, 2.0])},
     r"lora_unet_conv_in\.alpha has shape \(2,\); an alpha is one number"),
], ids=["alpha-nan", "up-fp16-inf", "alpha-a-vector"])
def test_a_damaged_lora_file_is_refused_naming_its_key(tmp_path, state, message):
    """From the second LoRA review: NaN/inf values were fused, and every image came out NaN with the error blaming
    the precision; an alpha that is not one number was a traceback."""
    save_safetensors(tmp_path / "damaged.safetensors", state)
    with pytest.raises(LoraError, match=message):
        read_lora(tmp_path / "damaged.safetensors")


def test_an_fp8_lora_file_is_read(tmp_path):
    """The finiteness check takes fp8 files (torch has no isfinite for them) as it takes fp16 ones."""
    state = {key: value.to(torch.float8_e4m3fn) for key, value in _kohya_layer("lora_unet_conv_in").items()}
    save_safetensors(tmp_path / "fp8.safetensors", state)
    assert [layer.module for layer in read_lora(tmp_path / "fp8.safetensors").layers] == ["conv_in"]


def test_the_same_lora_given_twice_is_warned_about(sd_folder, lora_a, caplog):
    """From the export options review: --lora L --lora L fused it twice, silently (diffusers refuses the adapter name
    twice); it still fuses both, as one at the sum of the scales, with a warning naming the file."""
    once, twice = load_components(sd_folder), load_components(sd_folder)
    lora = read_lora(lora_a["peft"])
    fuse_loras(once, [(lora, 2.0)])
    with caplog.at_level("WARNING", logger="diffrt.export.lora_fuse"):
        fuse_loras(twice, [(lora, 1.0), (read_lora(lora_a["peft"]), 1.0)])
    assert "is given twice" in caplog.text and str(lora_a["peft"]) in caplog.text
    for name in once:
        for (key, a), b in zip(once[name].state_dict().items(), twice[name].state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)


def test_shape_mismatch_is_an_error(sd_folder, tmp_path):
    save_safetensors(tmp_path / "wide.safetensors", _kohya_layer("lora_unet_conv_in", width=48))
    with pytest.raises(LoraError, match="made for another model"):
        fuse_loras(load_components(sd_folder), [(read_lora(tmp_path / "wide.safetensors"), 1.0)])


# --- refits start from the base (row 8) -------------------------------------------------------


def test_refit_a_b_a_equals_a_alone(sd_folder, lora_a, lora_b):
    base = base_state(sd_folder)
    base_copy = {c: {k: v.clone() for k, v in s.items()} for c, s in base.items()}
    a, b = [(read_lora(lora_a["peft"]), 1.0)], [(read_lora(lora_b["kohya"]), 0.5)]

    engine = {c: dict(s) for c, s in base.items()}  # stands in for the weights inside an engine
    for loras in (a, b, a):
        for component, state in fused_state(base, loras).items():
            engine[component].update(state)

    only_a = fused_state(base, a)
    assert_states_close(engine, only_a, atol=0)
    assert changed_params(engine, base)
    assert_states_close(base, base_copy, atol=0)  # the base was not touched
    both = fused_state(base, a + b)
    assert changed_params(both, only_a)


# --- files and specs (row 12) -----------------------------------------------------------------


class _WritesMarker:
    """Unpickling this object creates a file: the stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_is_refused_without_unpickling(tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_WritesMarker(probe)))
    assert probe.exists()  # the payload is live: unpickling it would create the marker

    marker = tmp_path / "pwned"
    payload = pickle.dumps({"lora_unet_conv_in.lora_down.weight": _WritesMarker(marker)})
    for name in ("lora.bin", "lora.ckpt", "lora.pt", "disguised.safetensors"):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(LoraError, match="pickle|safetensors"):
            read_lora(tmp_path / name)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt", ".pth"])
def test_a_pickle_suffix_is_refused_by_name_with_the_fix(tmp_path, suffix):
    # RELIABILITY #12: a LoRA under a pickle's name is refused as a pickle before it is read, even
    # where its bytes would parse, and the error says what to do instead.
    path = tmp_path / f"lora{suffix}"
    save_safetensors(path, {"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3),
                            "lora_unet_conv_in.lora_up.weight": torch.ones(32, 2, 1, 1)})
    with pytest.raises(LoraError, match=rf"is a pickle \({suffix}\) file.*convert it to safetensors"):
        read_lora(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(LoraError, match="LoRA file not found"):
        read_lora(tmp_path / "nope.safetensors")


def test_folder_with_the_diffusers_weight_name_is_read(lora_a):
    assert read_lora(lora_a["peft"].parent).path == lora_a["peft"]


@pytest.mark.parametrize(
    "text, path, scale",
    [("a.safetensors", "a.safetensors", 1.0), ("dir/a.safetensors:0.5", "dir/a.safetensors", 0.5),
     ("a.safetensors:-1e-1", "a.safetensors", -0.1), ("C:\\loras\\a.safetensors", "C:\\loras\\a.safetensors", 1.0)],
)
def test_lora_spec_parse(text, path, scale):
    assert LoraSpec.parse(text) == LoraSpec(Path(path), scale)


@pytest.mark.parametrize("text", ["a.safetensors:strong", "a.safetensors:", "a.safetensors:nan", ":0.5"])
def test_lora_spec_bad_scale(text):
    with pytest.raises(LoraError, match="FILE|finite"):
        LoraSpec.parse(text)


def test_read_loras_from_specs(lora_a):
    ((lora, scale),) = read_loras([f"{lora_a['kohya']}:0.25"])
    assert lora.format == "kohya" and scale == 0.25


# --- DoRA and lora_B.bias, against diffusers' fuse_lora ---------------------------------------
#
# peft merges a DoRA adapter as W' = m * (W + dW) / ||W0 + dW||, the norm per output row, with the
# fuse_lora scale inside dW; a lora_B.bias adds scale * scaling * bias to the bias. diffusers is the
# oracle for the UNet. For the text encoder it is not: diffusers 0.42 loads it through transformers 5,
# which leaves its DoRA magnitudes at peft's initial ||W|| (see the test below), so the reference
# text encoder is given the file's magnitudes before diffusers fuses it.

BIASED_UNET_TARGETS = ["to_out.0", "proj_in", "ff.net.2", "conv1"]  # lora_bias needs modules with a bias


def write_peft_lora(folder: Path, out: Path, seed: int, *, use_dora=False, lora_bias=False) -> Path:
    """An adapter saved as diffusers saves one (`save_lora_weights` with its LoraConfig), with
    seeded noise in every lora_A / lora_B, and DoRA magnitudes and LoRA biases moved off peft's
    initial values (||W|| and zero), which would hide a fuse that ignores them."""
    import warnings

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    from diffrt.tiny import TEXT_ENCODER_LORA_TARGETS, UNET_LORA_TARGETS, _randomise_lora

    generator = torch.Generator().manual_seed(seed)
    options = dict(r=4, lora_alpha=8, use_dora=use_dora, lora_bias=lora_bias,
                   init_lora_weights=True if lora_bias else "gaussian")  # peft refuses lora_bias with gaussian init
    configs = {"unet": LoraConfig(target_modules=BIASED_UNET_TARGETS if lora_bias else UNET_LORA_TARGETS, **options),
               "text_encoder": LoraConfig(target_modules=TEXT_ENCODER_LORA_TARGETS, **options)}
    models = {"unet": UNet2DConditionModel.from_pretrained(folder / "unet"),
              "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder")}
    layers = {}
    for component, model in models.items():
        model.add_adapter(configs[component])
        _randomise_lora(model, generator, std_b=0.05)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))
                elif name.endswith("lora_B.default.bias"):
                    param.normal_(0.0, 0.1, generator=generator)
        with warnings.catch_warnings():  # peft takes the 1-D lora_B.bias for a tensor left sharded by ZeRO-3
            warnings.simplefilter("ignore")
            layers[component] = get_peft_model_state_dict(model)
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        unet_lora_adapter_metadata=configs["unet"].to_dict(), text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict(),
        safe_serialization=True,
    )
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def dora(sd_folder, tmp_path_factory) -> dict[str, Path]:
    """Two DoRA adapters ("a", "b") and one with LoRA bias terms ("bias"), each on the UNet and text encoder."""
    def make(seed: int, **options) -> Path:
        return write_peft_lora(sd_folder, tmp_path_factory.mktemp(f"dora{seed}"), seed, **options)

    return {"a": make(3, use_dora=True), "b": make(4, use_dora=True), "bias": make(5, lora_bias=True)}


def set_text_encoder_magnitudes(text_encoder, path: Path, adapter: str) -> int:
    """Give the peft text encoder the file's DoRA magnitudes, as diffusers gives the UNet its own."""
    from safetensors.torch import load_file

    state = load_file(path)
    count = 0
    for name, module in text_encoder.named_modules():
        magnitude = state.get(f"text_encoder.{name}.lora_magnitude_vector")
        if magnitude is not None:
            module.lora_magnitude_vector[adapter].weight.data.copy_(magnitude)
            count += 1
    return count


def diffusers_fuse_lora(folder, loras: list[tuple[Path, float]], lora_scale: float) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' `load_lora_weights` for each file, `set_adapters` with their weights, then
    `fuse_lora(lora_scale=lora_scale)`: the weights it leaves."""
    pipe = load_pipeline(folder)
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(path, adapter_name=name)
        set_text_encoder_magnitudes(pipe.text_encoder, path, name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    pipe.fuse_lora(lora_scale=lora_scale)
    pipe.unload_lora_weights()
    return {c: getattr(pipe, c).state_dict() for c in COMPONENTS}


def replace_layers(lora, **changes):
    """The same LoRA file with every layer changed (magnitude=None: the DoRA file read as a plain LoRA)."""
    from dataclasses import replace

    return replace(lora, layers=[replace(layer, **changes) for layer in lora.layers])


def assert_states_match(actual, expected, rel=1e-6):
    """Every tensor within `rel` of its largest value (a relative tolerance, tighter than 1e-5)."""
    for component in COMPONENTS:
        assert actual[component].keys() == expected[component].keys()
        for name, value in expected[component].items():
            error = (actual[component][name] - value).abs().max()
            assert error <= rel * value.abs().max(), f"{component}.{name}: off by {error:.3g}"


@pytest.mark.parametrize("scale", [0.6, 1.7])
def test_dora_fuse_matches_diffusers_fuse_lora(sd_folder, dora, scale):
    lora = read_lora(dora["a"])
    assert lora.format == "peft" and all(layer.magnitude is not None for layer in lora.layers)
    ours, report = diffrt_fused(sd_folder, [(dora["a"], scale)])
    assert_states_match(ours, diffusers_fuse_lora(sd_folder, [(dora["a"], 1.0)], lora_scale=scale))
    patched = {f"{c}.{m}.weight" for c, names in report.loras[0].modules.items() for m in names}
    assert changed_params(ours, base_state(sd_folder)) == patched and len(patched) == len(lora.layers)

    # Not a plain LoRA, and not linear in the scale: fused at s is not base + s * (fused at 1 - base).
    plain = [(replace_layers(lora, magnitude=None), scale)]
    assert changed_params(fused_state(base_state(sd_folder), plain), ours) == patched
    base = base_state(sd_folder)
    at_one = fused_state(base, [(lora, 1.0)])
    linear = {c: {k: base[c][k] + scale * (at_one[c][k] - base[c][k]) for k in base[c]} for c in COMPONENTS}
    assert changed_params(linear, ours) == patched


def test_diffusers_leaves_the_text_encoders_dora_magnitudes_at_their_init(sd_folder, dora):
    """Why the reference text encoder gets the file's magnitudes by hand: diffusers 0.42 +
    transformers 5 load the UNet's, but leave the text encoder's at peft's initial ||W||. diffrt
    fuses the file's magnitudes in both. (If this starts failing, diffusers loads them itself: drop
    `set_text_encoder_magnitudes`.)"""
    from safetensors.torch import load_file

    state = load_file(dora["a"])
    pipe = load_pipeline(sd_folder)
    pipe.load_lora_weights(dora["a"], adapter_name="a")
    for component in COMPONENTS:
        for name, module in getattr(pipe, component).named_modules():
            key = f"{component}.{name}.lora_magnitude_vector"
            if key not in state:
                continue
            loaded = module.lora_magnitude_vector["a"].weight.detach()
            base = module.base_layer.weight.detach()
            initial = torch.linalg.vector_norm(base.reshape(base.shape[0], -1), dim=1)
            if component == "unet":
                assert torch.equal(loaded, state[key]), key
            else:
                torch.testing.assert_close(loaded, initial, msg=key)
                assert not torch.allclose(loaded, state[key]), key


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
@pytest.mark.parametrize("which", [[("a", 0.8), ("b", -0.5)], [("plain", 0.7), ("a", 0.5)], [("a", 0.5), ("plain", 0.7)]],
                         ids=["dora-dora", "plain-dora", "dora-plain"])
def test_several_loras_with_dora_match_diffusers(sd_folder, dora, lora_a, which):
    """diffusers fuses the adapters one after another; a DoRA adapter's norm is of the base weight with
    its own update (peft takes the earlier adapters out to measure it), its factor multiplies the
    weight that already holds them. So order matters, and diffrt fuses in the order given."""
    files = {**dora, "plain": lora_a["peft"]}
    loras = [(files[name], scale) for name, scale in which]
    ours, _ = diffrt_fused(sd_folder, loras)
    assert_states_match(ours, diffusers_fuse_lora(sd_folder, loras, lora_scale=1.0))
    if which[0][0] != "plain":
        swapped, _ = diffrt_fused(sd_folder, loras[::-1])
        assert changed_params(swapped, ours)


@pytest.mark.parametrize("scale", [0.6, 1.7])
def test_lora_bias_fuse_matches_diffusers_fuse_lora(sd_folder, dora, scale):
    lora = read_lora(dora["bias"])
    assert all(layer.bias is not None and layer.magnitude is None for layer in lora.layers)
    ours, report = diffrt_fused(sd_folder, [(dora["bias"], scale)])
    assert_states_match(ours, diffusers_fuse_lora(sd_folder, [(dora["bias"], 1.0)], lora_scale=scale))
    modules = [f"{c}.{m}" for c, names in report.loras[0].modules.items() for m in names]
    assert changed_params(ours, base_state(sd_folder)) == {f"{m}.{kind}" for m in modules for kind in ("weight", "bias")}
    base = base_state(sd_folder)
    for component, params in fused_params(base, [(lora, scale)]).items():  # refit's path: weights and biases alike
        for name, value in params.items():
            torch.testing.assert_close(value, ours[component][name], atol=1e-6, rtol=0)


def test_kohya_dora_scale_is_refused_because_diffusers_drops_it(sd_folder, lora_a, tmp_path):
    """A kohya/LyCORIS DoRA file (`lora_unet_....dora_scale`): diffusers' Stable Diffusion loader
    filters the dora_scale keys out with a warning and fuses the plain LoRA, so matching diffusers
    would mean dropping them without a word. diffrt refuses the file by name instead."""
    from safetensors.torch import load_file

    plain = load_file(lora_a["kohya"])
    with_dora = dict(plain)
    for key, up in plain.items():
        if key.endswith(".lora_up.weight"):  # LyCORIS' wd_on_out layout: [out, 1(, 1, 1)]
            with_dora[key.replace("lora_up.weight", "dora_scale")] = 0.5 + torch.rand(up.shape[0], *[1] * (up.ndim - 1))
    path = tmp_path / "kohya_dora.safetensors"
    save_safetensors(path, with_dora)
    assert_states_match(diffusers_fused(sd_folder, [(path, 0.8)]), diffusers_fused(sd_folder, [(lora_a["kohya"], 0.8)]), rel=0)
    with pytest.raises(LoraError, match=r"kohya/LyCORIS DoRA, whose dora_scale diffusers drops.*lora_te_.*\.dora_scale") as error:
        read_lora(path)
    assert "\n" not in str(error.value)


def _peft_module(suffix: str, out=64, rank=2, inputs=64, **extra) -> dict[str, torch.Tensor]:
    name = f"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.{suffix}"
    return {f"{name}.lora_A.weight": torch.ones(rank, inputs), f"{name}.lora_B.weight": torch.ones(out, rank),
            **{f"{name}.{key}": value for key, value in extra.items()}}


@pytest.mark.parametrize("state, metadata, message", [
    (_peft_module("to_out.0", lora_magnitude_vector=torch.ones(64), **{"lora_B.bias": torch.ones(64)}), None,
     "both a DoRA magnitude and a lora_B.bias, which peft refuses"),
    (_peft_module("to_out.0", lora_magnitude_vector=torch.ones(32)), None,
     r"lora_magnitude_vector has shape \(32,\) but its module has 64 output channels"),
    (_peft_module("to_out.0", lora_magnitude_vector=torch.ones(64)), {"unet.r": 2, "unet.lora_alpha": 2},
     "gives unet use_dora=False but .*to_out.0 has magnitude"),
    (_peft_module("to_out.0"), {"unet.r": 2, "unet.lora_alpha": 2, "unet.use_dora": True},
     "gives unet use_dora=True but .*to_out.0 has no lora_magnitude_vector"),
], ids=["dora-and-bias", "magnitude-length", "magnitude-without-use_dora", "use_dora-without-magnitude"])
def test_inconsistent_dora_files_are_refused(tmp_path, state, metadata, message):
    import json

    path = tmp_path / "bad.safetensors"
    save_safetensors(path, state, metadata={"lora_adapter_metadata": json.dumps(metadata)} if metadata else None)
    with pytest.raises(LoraError, match=message):
        read_lora(path)


def test_lora_bias_on_a_module_without_bias_is_refused(sd_folder, tmp_path):
    save_safetensors(tmp_path / "to_q_bias.safetensors", _peft_module("to_q", **{"lora_B.bias": torch.ones(64)}))
    components = load_components(sd_folder)
    with pytest.raises(LoraError, match=r"lora_B.bias adds to the bias of unet\..*to_q, which has none"):
        fuse_loras(components, [(read_lora(tmp_path / "to_q_bias.safetensors"), 1.0)])


def test_dora_refits_start_from_the_base(sd_folder, dora, lora_b):
    """A, B, A over one engine's weights gives A exactly, DoRA included (row 8): each DoRA weight is
    computed from the base."""
    base = base_state(sd_folder)
    a, b = [(read_lora(dora["a"]), 0.8)], [(read_lora(lora_b["kohya"]), 0.5), (read_lora(dora["b"]), 1.2)]
    engine = {c: dict(s) for c, s in base.items()}
    for loras in (a, b, a):
        for component, state in fused_state(base, loras).items():
            engine[component].update(state)
    assert_states_close(engine, fused_state(base, a), atol=0)
    assert changed_params(engine, base)


def test_dora_export_equals_diffusers_fuse_lora(sd_folder, dora, tmp_path):
    """`diffrt export --lora DORA:0.8`: the ONNX text encoder and UNet give what diffusers' own
    modules give after fuse_lora."""
    from diffrt.components import spec_from_dict
    from diffrt.export.options import ExportOptions
    from diffrt.export.text_to_image import export_text_to_image
    from diffrt.export.verify import compare
    from diffrt.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from diffrt.text_to_image_models import load_text_to_image

    out = tmp_path / "artifact"
    manifest = export_text_to_image(sd_folder, out, ExportOptions(batch=(1, 2, 2), loras=[(str(dora["a"]), 0.8)], verify=False),
                                    []).manifest
    pipe = load_pipeline(sd_folder)
    pipe.load_lora_weights(dora["a"], adapter_name="a")
    assert set_text_encoder_magnitudes(pipe.text_encoder, dora["a"], "a") == 8  # q, k, v, out of both layers
    pipe.fuse_lora(lora_scale=0.8)
    base = load_text_to_image(sd_folder)
    for name, reference, before in (("text_encoder", pipe.text_encoder, base.text_encoder), ("unet", pipe.unet, base.unet)):
        backend = OnnxRuntimeBackend(out / name / "model.onnx", spec_from_dict(manifest["components"][name]["spec"]), threads=1)
        feed = backend.spec.example_feed(seed=3, batch=2)
        with torch.no_grad():
            if name == "text_encoder":
                feed["clip_skip"] = torch.zeros_like(feed["clip_skip"])  # the last hidden state, which the references return
                expected, unfused = reference(feed["input_ids"])[0], before(feed["input_ids"])[0]
            else:
                args = (feed["sample"], feed["timestep"], feed["encoder_hidden_states"])
                expected, unfused = reference(*args).sample, before(*args).sample
        got = next(iter(backend.run(feed).values()))
        assert compare(expected, got).max_rel <= 1e-4, name
        assert compare(unfused, got).max_rel > 1e-2, f"{name}: the LoRA changed nothing"


def test_an_engine_export_refuses_lora_bias_terms_before_building(sd_folder, dora, lora_b):
    """An engine takes its LoRA by refit, which sets weights, not biases: `diffrt export --backend
    tensorrt --lora BIAS` is refused by name before any engine is built, as refit would refuse it after."""
    from diffrt.errors import ArtifactError
    from diffrt.export.artifact import _check_loras

    _check_loras(load_components(sd_folder), [(str(dora["a"]), 0.8), (str(lora_b["kohya"]), 0.5)])  # weights only: fine
    with pytest.raises(ArtifactError, match=r"lora_B.bias.*refit. sets weights, not biases"):
        _check_loras(load_components(sd_folder), [(str(dora["bias"]), 1.0)])


def test_a_lora_on_an_embedding_table_is_refused_by_every_path(sd_folder, tmp_path):
    """The bug (a review's): CLIP's position embedding is a 2-D `.weight` as a Linear's is; fusing (torch, ONNX) refused a
    LoRA on it, while the engine export's check, the weight map and so refit, which read state dicts, took it."""
    from diffrt.export.artifact import _check_loras
    from diffrt.runtime.lora_scale import TorchLora

    width = load_components(sd_folder)["text_encoder"].config.hidden_size
    table = "lora_te_text_model_embeddings_position_embedding"
    state = {f"{table}.lora_down.weight": torch.ones(2, width), f"{table}.lora_up.weight": torch.ones(77, 2),
             f"{table}.alpha": torch.tensor(1.0)}
    save_safetensors(tmp_path / "table.safetensors", state)
    refused = r"none of its 1 LoRA modules matches a Linear/Conv2d module"
    with pytest.raises(LoraError, match=refused):
        fuse_loras(load_components(sd_folder), [(read_lora(tmp_path / "table.safetensors"), 1.0)])
    with pytest.raises(LoraError, match=refused):
        _check_loras(load_components(sd_folder), [(str(tmp_path / "table.safetensors"), 1.0)])
    with pytest.raises(LoraError, match=refused):
        TorchLora(load_components(sd_folder), [(str(tmp_path / "table.safetensors"), 1.0)])


def test_a_flat_down_weight_on_a_3x3_convolution_is_refused(sd_folder, tmp_path):
    """A peft-format lora_A of shape [r, in * 3 * 3] for a 3x3 convolution: diffusers refuses it (peft's LoRA of a
    convolution has a kernel), and so does diffrt, where it used to flatten and fuse it."""
    conv = load_components(sd_folder)["unet"].conv_in
    out_channels, in_channels, kh, kw = conv.weight.shape
    state = {"unet.conv_in.lora_A.weight": torch.ones(2, in_channels * kh * kw),
             "unet.conv_in.lora_B.weight": torch.ones(out_channels, 2)}
    save_safetensors(tmp_path / "flat.safetensors", state)
    with pytest.raises(LoraError, match="made for another model"):
        fuse_loras(load_components(sd_folder), [(read_lora(tmp_path / "flat.safetensors"), 1.0)])
    state["unet.conv_in.lora_A.weight"] = torch.ones(2, in_channels, kh, kw)  # the kernel: fused
    state["unet.conv_in.lora_B.weight"] = torch.ones(out_channels, 2, 1, 1)
    save_safetensors(tmp_path / "kernel.safetensors", state)
    assert fuse_loras(load_components(sd_folder), [(read_lora(tmp_path / "kernel.safetensors"), 1.0)]).loras[0].num_modules == 1
