"""LyCORIS LoHa and LoKr files (kohya naming), fused by diffrt, checked against peft's own merge.

The oracle is peft (`peft.tuners.loha`, `peft.tuners.lokr`): an adapter with random non-zero
factors is put on the tiny UNet or text encoder, its factors are written under the LyCORIS names
(`lora_unet_<module>.hada_w1_a`, ..., `.lokr_w1`, ..., `.alpha`), and diffrt's fused weights must
equal peft's `merge_and_unload()`. Where peft's LoKr scaling differs from LyCORIS' (w1 and w2 both
full matrices: peft alpha / r, LyCORIS 1, see `diffrt.export.lora_fuse`), the reference is peft's
merge with the scaling LyCORIS' LokrModule uses.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from diffrt.atomic import save_safetensors
from diffrt.errors import LoraError
from diffrt.export.lora import read_lora
from diffrt.export.lora_fuse import fuse_loras, fused_params
from diffrt.tiny import tiny_text_to_image

STD = 0.3  # factor entries: the updates come out at 10-100% of the tiny models' weights
PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return tiny_text_to_image(tmp_path_factory.mktemp("tiny_sd"), seed=0)


def load(folder: Path, component: str) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    cls = UNet2DConditionModel if component == "unet" else CLIPTextModel
    return cls.from_pretrained(folder / component)


def peft_model(folder: Path, component: str, configs: dict, seed: int):
    """The component with peft adapters {name: config} on it, every factor seeded noise (peft
    initialises one factor to zero, which would hide a dropped update)."""
    from peft import get_peft_model

    names = list(configs)
    model = get_peft_model(load(folder, component), configs[names[0]], adapter_name=names[0], mixed=len(names) > 1)
    for name in names[1:]:
        model.add_adapter(name, configs[name])
    if len(names) > 1:
        model.set_adapter(names)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if any(f".{kind}" in name for kind in ("hada_", "lokr_", "lora_A", "lora_B")):
                param.normal_(0.0, STD if "lora_" not in name else 0.1, generator=generator)
    return model


def adapter_layers(model, adapter: str):
    """(module name in the plain model, peft layer) for every module the adapter patches."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    root = model.base_model.model
    for name, module in root.named_modules():
        if isinstance(module, BaseTunerLayer) and adapter in getattr(module, "scaling", {}):
            yield name.replace(".base_layer", ""), module  # peft's mixed adapters nest one layer in the next


def kohya_key(component: str, name: str) -> str:
    # Published text-encoder files keep CLIP's `text_model.` level, which transformers 5 dropped.
    if component == "text_encoder" and not name.startswith("text_model."):
        name = f"text_model.{name}"
    return PREFIX[component] + name.replace(".", "_")


def lycoris_state(model, component: str, adapter: str) -> dict[str, torch.Tensor]:
    """The adapter's factors under the LyCORIS/kohya names, with its alpha; a peft LoRA adapter as
    lora_down / lora_up."""
    state = {}
    for name, layer in adapter_layers(model, adapter):
        key = kohya_key(component, name)
        if hasattr(layer, "lora_A"):
            state[f"{key}.lora_down.weight"] = layer.lora_A[adapter].weight.detach().clone()
            state[f"{key}.lora_up.weight"] = layer.lora_B[adapter].weight.detach().clone()
            state[f"{key}.alpha"] = torch.tensor(float(layer.lora_alpha[adapter]))
            continue
        for factor in layer.adapter_layer_names:
            if adapter in getattr(layer, factor):
                state[f"{key}.{factor}"] = getattr(layer, factor)[adapter].detach().clone()
        state[f"{key}.alpha"] = torch.tensor(float(layer.alpha[adapter]))
    return state


def lycoris_gamma(layer, adapter: str) -> float:
    """LyCORIS' LokrModule scale: alpha / rank, but 1 where lokr_w1 and lokr_w2 are both full."""
    full = adapter in layer.lokr_w1 and adapter in layer.lokr_w2
    return 1.0 if full else layer.alpha[adapter] / layer.r[adapter]


def peft_merged(model, scales: dict[str, float], lycoris_rule: bool = False) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload of a copy of `model`, each adapter's scaling times its scale."""
    model = copy.deepcopy(model)
    for adapter, scale in scales.items():
        for _, layer in adapter_layers(model, adapter):
            if lycoris_rule and hasattr(layer, "lokr_w1"):
                layer.scaling[adapter] = lycoris_gamma(layer, adapter)
            layer.scaling[adapter] *= scale
    return model.merge_and_unload().state_dict()


def diffrt_fused(folder: Path, component: str, loras: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    model = load(folder, component)
    fuse_loras({component: model}, [(read_lora(path), scale) for path, scale in loras])
    return model.state_dict()


def assert_matches(actual, expected, base, rel=1e-5) -> int:
    """Every tensor within `rel` of its largest value; returns how many the update changed."""
    assert actual.keys() == expected.keys()
    changed = 0
    for name, value in expected.items():
        error = (actual[name] - value).abs().max()
        assert error <= rel * value.abs().max(), f"{name}: off by {error:.3g} of {value.abs().max():.3g}"
        changed += not torch.equal(value, base[name])
    return changed


def save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_safetensors(path, state)
    return path


# --- one file equals peft's merge ----------------------------------------------------------------

UNET_TARGETS = ["to_q", "to_k", "proj_in", "conv1", "ff.net.2"]  # Linear, 1x1 conv, 3x3 conv
TE_TARGETS = ["q_proj", "v_proj", "fc1"]  # fc1 is 37 x 32: LoKr factorises 37 as 1 x 37


def configs():
    from peft import LoHaConfig, LoKrConfig

    return {
        "loha": lambda targets: LoHaConfig(r=4, alpha=8, target_modules=targets),
        # r 2: lokr_w1 full, lokr_w2 = lokr_w2_a @ lokr_w2_b (LyCORIS' default layout)
        "lokr": lambda targets: LoKrConfig(r=2, alpha=3, target_modules=targets),
        # decompose_both at r 1: lokr_w1_a @ lokr_w1_b too
        "lokr-both": lambda targets: LoKrConfig(r=1, alpha=3, target_modules=targets, decompose_both=True),
        # r 4 on 64 = 8 x 8: lokr_w1 and lokr_w2 both full (alpha = r, so peft and LyCORIS agree), most modules
        "lokr-full": lambda targets: LoKrConfig(r=4, alpha=4, target_modules=targets),
    }


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
@pytest.mark.parametrize("kind", ["loha", "lokr", "lokr-both", "lokr-full"])
def test_fuse_equals_peft_merge(sd_folder, tmp_path, kind, component):
    targets = UNET_TARGETS if component == "unet" else TE_TARGETS
    model = peft_model(sd_folder, component, {"one": configs()[kind](targets)}, seed=1)
    path = save(tmp_path / f"{kind}.safetensors", lycoris_state(model, component, "one"))
    lora = read_lora(path)
    assert lora.format == "kohya" and {layer.kind for layer in lora.layers} == {kind.partition("-")[0]}
    if kind == "lokr":
        assert all("lokr_w1" in x.factors and "lokr_w2_a" in x.factors for x in lora.layers)
    if kind == "lokr-both":
        assert all("lokr_w1_a" in x.factors and "lokr_w2_a" in x.factors for x in lora.layers)
    if kind == "lokr-full" and component == "unet":
        assert sum("lokr_w2" in x.factors for x in lora.layers) > len(lora.layers) / 2

    base = load(sd_folder, component).state_dict()
    for scale in (1.0, -0.6):
        ours = diffrt_fused(sd_folder, component, [(path, scale)])
        changed = assert_matches(ours, peft_merged(model, {"one": scale}), base)
        assert changed == len(lora.layers) == len(list(adapter_layers(model, "one")))


def test_lokr_with_two_full_factors_follows_lycoris_not_peft(sd_folder, tmp_path):
    """alpha != r where lokr_w1 and lokr_w2 are both full: LyCORIS (and A1111, ComfyUI) scale the
    kron by 1, peft by alpha / r. diffrt follows LyCORIS; modules with a factorised factor agree."""
    from peft import LoKrConfig

    model = peft_model(sd_folder, "unet", {"one": LoKrConfig(r=4, alpha=2, target_modules=UNET_TARGETS)}, seed=2)
    path = save(tmp_path / "full.safetensors", lycoris_state(model, "unet", "one"))
    layers = read_lora(path).layers
    full = [x for x in layers if x.rank is None]
    assert full and len(full) < len(layers)  # both kinds of module are in the file
    assert all(x.scaling == 1.0 for x in full) and all(x.scaling == 0.5 for x in layers if x.rank is not None)

    base = load(sd_folder, "unet").state_dict()
    ours = diffrt_fused(sd_folder, "unet", [(path, 0.8)])
    assert_matches(ours, peft_merged(model, {"one": 0.8}, lycoris_rule=True), base)
    peft_rule = peft_merged(model, {"one": 0.8})
    for layer in layers:
        name = next(n for n in peft_rule if n.replace(".", "_") == f"{layer.module}_weight")
        differs = not torch.allclose(ours[name], peft_rule[name], atol=1e-6, rtol=0)
        assert differs == (layer.rank is None), name


# --- several files, with plain LoRA --------------------------------------------------------------


def test_loha_lokr_and_lora_files_at_once_equal_peft_mixed_merge(sd_folder, tmp_path):
    """A LoHa, a LoKr and a plain (kohya) LoRA file on overlapping modules, each at its own scale,
    equal peft's mixed-adapter merge of the three adapters."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    model = peft_model(sd_folder, "unet", {
        "hadamard": LoHaConfig(r=4, alpha=8, target_modules=["to_q", "proj_in", "conv1"]),
        "kronecker": LoKrConfig(r=2, alpha=3, target_modules=["to_q", "to_k", "conv1"]),
        "plain": LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "conv2"]),
    }, seed=3)
    scales = {"hadamard": 0.7, "kronecker": -0.5, "plain": 1.3}
    paths = {a: save(tmp_path / f"{a}.safetensors", lycoris_state(model, "unet", a)) for a in scales}
    loras = [(paths[a], s) for a, s in scales.items()]

    base = load(sd_folder, "unet").state_dict()
    ours = diffrt_fused(sd_folder, "unet", loras)
    assert assert_matches(ours, peft_merged(model, scales), base) > 0

    # refit's way in (fused_params over a state dict) collects the same layers and weights as fusing into the modules
    # (the values themselves are judged against peft above)
    files = [(read_lora(p), s) for p, s in loras]
    fused = fused_params({"unet": base}, files)["unet"]
    for name, value in fused.items():
        torch.testing.assert_close(value, ours[name], atol=1e-6, rtol=0)


# --- refused, in one line ------------------------------------------------------------------------


def _loha(name: str, out=64, inputs=64, rank=2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"{name}.hada_w1_a": torch.randn(out, rank, generator=g), f"{name}.hada_w1_b": torch.randn(rank, inputs, generator=g),
            f"{name}.hada_w2_a": torch.randn(out, rank, generator=g), f"{name}.hada_w2_b": torch.randn(rank, inputs, generator=g),
            f"{name}.alpha": torch.tensor(1.0)}


_TO_Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


def test_unmatched_lycoris_keys_are_named_and_change_nothing(sd_folder, tmp_path):
    state = _loha(_TO_Q)
    for i in range(3):
        state |= _loha(f"lora_unet_down_blocks_9_attentions_{i}_proj_in")
    path = save(tmp_path / "partial.safetensors", state)
    unet = load(sd_folder, "unet")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(LoraError) as error:
        fuse_loras({"unet": unet}, [(read_lora(path), 1.0)])
    message = str(error.value)
    assert "3 of its 4 LoRA modules match no" in message and "\n" not in message
    assert all(f"lora_unet_down_blocks_9_attentions_{i}_proj_in.hada_w1_a" in message for i in range(3))
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


@pytest.mark.parametrize("extra", [
    {f"{_TO_Q}.hada_t1": torch.ones(2, 2, 3, 3), f"{_TO_Q}.hada_t2": torch.ones(2, 2, 3, 3)},
    {f"{_TO_Q}.lokr_t2": torch.ones(2, 2, 3, 3)},
], ids=["loha-tucker", "lokr-tucker"])
def test_tucker_cores_are_refused_by_name(tmp_path, extra):
    path = save(tmp_path / "tucker.safetensors", _loha(_TO_Q) | extra)
    with pytest.raises(LoraError) as error:
        read_lora(path)
    message = str(error.value)
    assert "Tucker" in message and all(key in message for key in extra) and "\n" not in message

    assert "outside kohya naming" not in message  # the more specific hint, alone


def test_a_lycoris_file_outside_kohya_naming_is_refused_saying_what_it_is(tmp_path):
    """peft/diffusers-style dotted names with LyCORIS factors: not read, but named, with where diffrt reads them."""
    path = save(tmp_path / "dotted.safetensors", {f"unet.down_blocks.0.attentions.0.proj_in.{n}": torch.randn(4, 4)
                                                  for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")})
    with pytest.raises(LoraError, match=r"LyCORIS LoHa outside kohya naming \(diffrt reads it under lora_unet_"):
        read_lora(path)


@pytest.mark.parametrize("state, message", [
    ({k: v for k, v in _loha(_TO_Q).items() if not k.endswith("hada_w2_b")}, r"loha module unet\.\S+to_q has no hada_w2_b"),
    (_loha(_TO_Q) | {f"{_TO_Q}.lora_down.weight": torch.ones(2, 64)}, r"mixes loha and lora keys"),
    ({f"{_TO_Q}.lokr_w1": torch.ones(8, 8), f"{_TO_Q}.lokr_w2_a": torch.ones(8, 2)}, r"lokr module \S+ has no lokr_w2_b"),
    ({f"{_TO_Q}.lokr_w1": torch.ones(8, 8), f"{_TO_Q}.lokr_w1_a": torch.ones(8, 2), f"{_TO_Q}.lokr_w1_b": torch.ones(2, 8),
      f"{_TO_Q}.lokr_w2": torch.ones(8, 8)}, r"has both \S+lokr_w1 and a factorised lokr_w1_a/lokr_w1_b"),
    ({f"{_TO_Q}.lokr_w1_a": torch.ones(8, 2), f"{_TO_Q}.lokr_w1_b": torch.ones(2, 8),
      f"{_TO_Q}.lokr_w2_a": torch.ones(8, 3), f"{_TO_Q}.lokr_w2_b": torch.ones(3, 8)}, r"lokr_w1 at rank 2 and lokr_w2 at rank 3"),
    (_loha(_TO_Q) | {f"{_TO_Q}.alpha": torch.tensor(0.0)}, r"to_q\.alpha gives alpha 0"),
    (_loha(_TO_Q) | {f"{_TO_Q}.hada_w2_a": torch.zeros(64, 2)}, r"every LoRA update in it is zero"),
], ids=["missing-factor", "mixed-kinds", "lokr-missing", "lokr-both-forms", "lokr-ranks", "alpha-0", "untrained"])
def test_inconsistent_lycoris_files_are_refused_in_one_line(tmp_path, state, message):
    path = save(tmp_path / "bad.safetensors", state)
    with pytest.raises(LoraError, match=message) as error:
        read_lora(path)
    assert "\n" not in str(error.value)


def test_lycoris_shape_mismatch_is_an_error(sd_folder, tmp_path):
    path = save(tmp_path / "wide.safetensors", _loha(_TO_Q, inputs=48))
    with pytest.raises(LoraError, match=r"update of shape \(64, 48\) for a weight of shape \(64, 64\).*another model"):
        fuse_loras({"unet": load(sd_folder, "unet")}, [(read_lora(path), 1.0)])


# --- baked into an ONNX export -------------------------------------------------------------------


def test_export_with_lycoris_baked_in_equals_fused_pytorch(sd_folder, tmp_path):
    """`diffrt export --lora LYCORIS:0.8` with one file holding LoHa (UNet) and LoKr (text encoder)
    modules: the ONNX text encoder and UNet give what the PyTorch modules give after fuse_loras."""
    from peft import LoHaConfig, LoKrConfig

    from diffrt.components import spec_from_dict
    from diffrt.export.options import ExportOptions
    from diffrt.export.text_to_image import export_text_to_image
    from diffrt.export.verify import compare
    from diffrt.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from diffrt.text_to_image_models import load_text_to_image

    unet = peft_model(sd_folder, "unet", {"one": LoHaConfig(r=4, alpha=8, target_modules=UNET_TARGETS)}, seed=4)
    te = peft_model(sd_folder, "text_encoder", {"one": LoKrConfig(r=2, alpha=3, target_modules=TE_TARGETS)}, seed=5)
    path = save(tmp_path / "lycoris.safetensors", lycoris_state(unet, "unet", "one") | lycoris_state(te, "text_encoder", "one"))

    out = tmp_path / "artifact"
    manifest = export_text_to_image(sd_folder, out, ExportOptions(batch=(1, 2, 2), loras=[(str(path), 0.8)], verify=False),
                                    []).manifest
    base = load_text_to_image(sd_folder)
    fused = load_text_to_image(sd_folder)
    fuse_loras({"unet": fused.unet, "text_encoder": fused.text_encoder}, [(read_lora(path), 0.8)])
    for name in ("text_encoder", "unet"):
        backend = OnnxRuntimeBackend(out / name / "model.onnx", spec_from_dict(manifest["components"][name]["spec"]), threads=1)
        feed = backend.spec.example_feed(seed=3, batch=2)
        with torch.no_grad():
            if name == "text_encoder":
                feed["clip_skip"] = torch.zeros_like(feed["clip_skip"])  # the last hidden state, which the references return
                expected, unfused = fused.text_encoder(feed["input_ids"])[0], base.text_encoder(feed["input_ids"])[0]
            else:
                args = (feed["sample"], feed["timestep"], feed["encoder_hidden_states"])
                expected, unfused = fused.unet(*args).sample, base.unet(*args).sample
        got = next(iter(backend.run(feed).values()))
        assert compare(expected, got).max_rel <= 1e-4, name
        assert compare(unfused, got).max_rel > 1e-2, f"{name}: the LoRA changed nothing"
