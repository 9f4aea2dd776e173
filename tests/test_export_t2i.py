"""Text-to-image export: every component's ONNX equals PyTorch across its declared ranges, the
fused UNet+ControlNet equals diffusers' UNet+ControlNet step (and with two ControlNets, diffusers'
MultiControlNetModel step), LoRA-baked exports equal diffusers' fuse_lora, and the artifact is
cached, checked and refused when tampered with (RELIABILITY #5, #7, #10, #11, #17).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import T2I_ARTIFACT_OPTIONS, T2I_RANGES
from diffrt.atomic import sha256_file
from diffrt.errors import ArtifactError, DiffrtError, LoraError
from diffrt.export.artifact import export_model
from diffrt.export import manifest as mf
from diffrt.export.cache import cached_export
from diffrt.export.options import ExportOptions
from diffrt.export.text_to_image import build_precision, export_text_to_image
from diffrt.export.verify import compare
from diffrt.runtime.backends.onnxruntime import OnnxRuntimeBackend
from diffrt.runtime.backends.torch_eager import TorchBackend
from diffrt.runtime.text_to_image_loading import artifact_text_to_image_pipeline, open_text_to_image_pipeline
from diffrt.text_to_image_models import load_text_to_image

TOL = 1e-4  # fp32: max |onnx - torch| / max |torch|
COMPONENTS = {"text_encoder", "unet_controlnet", "controlnet", "vae_decoder", "vae_encoder"}


@pytest.fixture(scope="module")
def manifest(t2i_artifact):
    from diffrt.export.manifest import read_manifest

    return read_manifest(t2i_artifact)


@pytest.fixture(scope="module")
def model(t2i_folder):
    return load_text_to_image(t2i_folder, t2i_folder / "controlnet")


def ort(artifact, manifest, name):
    from diffrt.components import spec_from_dict

    return OnnxRuntimeBackend(artifact / name / "model.onnx", spec_from_dict(manifest["components"][name]["spec"]), threads=1)


# --- the artifact ------------------------------------------------------------------------------------


def test_manifest_records_the_pipeline(t2i_artifact, manifest):
    import onnx

    assert manifest["kind"] == "text-to-image" and set(manifest["components"]) == COMPONENTS
    pipe = manifest["pipeline"]
    assert pipe["vae_scaling_factor"] == pytest.approx(0.18215) and pipe["vae_force_upcast"] is True
    assert pipe["scheduler"]["beta_schedule"] == "scaled_linear" and pipe["max_length"] == 77
    assert pipe["unet"] == "unet_controlnet" and manifest["opset"] >= 17
    assert {"vocab.json", "merges.txt"} <= set(pipe["tokenizer"]["files"])
    assert all((t2i_artifact / "tokenizer" / f).is_file() for f in pipe["tokenizer"]["files"])
    assert set(manifest["source"]["parts"]) == {"text_encoder", "tokenizer", "unet", "vae", "scheduler", "controlnet"}
    unet = manifest["components"]["unet_controlnet"]["spec"]
    # Pixel ranges are stored in latent pixels (/8); the control image keeps pixels.
    assert unet["ranges"]["height"] == [4, 4, 8] and unet["ranges"]["image_height"] == [32, 32, 64]
    assert unet["ranges"]["batch"] == list(T2I_RANGES["batch"]) and unet["multiple_of"]["height"] == 2
    for name, comp in manifest["components"].items():
        parity = comp["parity"]["onnxruntime"]
        assert parity["passed"] and parity["max_rel"] <= TOL and parity["cosine"] > 0.99999, name
        assert comp["precision"] == "fp32" and comp["bytes"] > 0
        onnx.checker.check_model(str(t2i_artifact / name / "model.onnx"))
    assert [o["name"] for o in manifest["components"]["controlnet"]["spec"]["outputs"]][-1] == "mid_block_res"


def test_vae_decoder_stays_fp32_where_the_vae_asks():
    assert build_precision("vae_decoder", "fp16", force_upcast=True) == "fp32"
    assert build_precision("vae_decoder", "fp16", force_upcast=False) == "fp16"
    assert build_precision("unet", "bf16", force_upcast=True) == "bf16"


def sizes_inside_ranges(name: str) -> list[dict[str, int]]:
    """Batch and latent sizes inside T2I_RANGES (batch 1..4, 32..64 px = 4..8 latent, multiples of 2)."""
    if name == "text_encoder":
        return [dict(batch=1, sequence=77), dict(batch=3, sequence=77), dict(batch=4, sequence=5)]
    points = [dict(batch=1, height=4, width=8), dict(batch=3, height=8, width=4), dict(batch=2, height=6, width=6)]
    return [{**p, "image_height": 8 * p["height"], "image_width": 8 * p["width"]} for p in points]


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_component_matches_pytorch_across_ranges(t2i_artifact, manifest, model, name):
    backend = ort(t2i_artifact, manifest, name)
    reference = TorchBackend(model.module(name), backend.spec)
    for i, sizes in enumerate(sizes_inside_ranges(name)):
        feed = backend.spec.example_feed(seed=100 + i, **sizes)
        backend.spec.check(feed)
        expected, got = reference.run(feed), backend.run(feed)
        assert expected.keys() == got.keys()
        for out in expected:
            assert got[out].shape == expected[out].shape, (name, out, sizes)
            assert compare(expected[out], got[out]).max_rel <= TOL, (name, out, sizes)


def diffusers_controlnet_step(unet, controlnet, feed, scale, guess_mode=False):
    """One step's noise prediction (and residuals) as StableDiffusionControlNetPipeline computes it for the
    conditional half. `controlnet` is a ControlNetModel, or a MultiControlNetModel whose ControlNets each take
    their own RGB image (stacked on the channel axis in the feed) at their own scale."""
    from diffusers import MultiControlNetModel

    t = feed["timestep"][0].long()  # diffusers passes the scheduler's int64 timestep
    cond = feed["controlnet_cond"]
    if isinstance(controlnet, MultiControlNetModel):
        cond = list(cond.split(3, dim=1))
    with torch.no_grad():
        down, mid = controlnet(feed["sample"], t, encoder_hidden_states=feed["encoder_hidden_states"], controlnet_cond=cond,
                               conditioning_scale=scale, guess_mode=guess_mode, return_dict=False)
        noise = unet(feed["sample"], t, encoder_hidden_states=feed["encoder_hidden_states"],
                     down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False)[0]
    return noise, [*down, mid]


def assert_controlnet_graphs_equal_diffusers(artifact, manifest, unet, controlnet, scales, seed, timestep):
    """The fused unet_controlnet graph's noise and the standalone controlnet graph's residuals equal
    diffusers' at each of two scale settings, which must give different steps (the scales are live), and in
    guess mode, where each ControlNet's row of scales holds its scale times logspace(-1, 0) by depth."""
    fused, alone = ort(artifact, manifest, "unet_controlnet"), ort(artifact, manifest, "controlnet")
    feed = fused.spec.example_feed(seed=seed, batch=2)
    feed["timestep"] = torch.full((2,), timestep)
    k, r = feed["conditioning_scale"].shape
    preds = []
    for scale, guess_mode in ((scales[0], False), (scales[1], False), (scales[1], True)):
        weights = torch.logspace(-1, 0, r) if guess_mode else torch.ones(r)
        feed["conditioning_scale"] = torch.tensor(scale if isinstance(scale, list) else [scale] * k)[:, None] * weights
        expected, residuals = diffusers_controlnet_step(unet, controlnet, feed, scale, guess_mode)
        got = fused.run(feed)["noise_pred"]
        assert compare(expected, got).max_rel <= TOL, guess_mode
        outs = alone.run(feed)
        for spec, ref in zip(alone.spec.outputs, residuals):
            assert compare(ref, outs[spec.name]).max_rel <= TOL, (spec.name, guess_mode)
        preds.append(got)
    assert (preds[0] - preds[1]).abs().max() > 1e-3  # non-zero ControlNet outputs: the scales are live in the graph
    assert (preds[1] - preds[2]).abs().max() > 1e-3  # and so are the depth weights


def test_fused_unet_controlnet_equals_diffusers(t2i_artifact, manifest, model):
    assert_controlnet_graphs_equal_diffusers(t2i_artifact, manifest, model.unet, model.controlnet, (0.5, 1.3), seed=7,
                                             timestep=801.0)


# --- several ControlNets (diffusers' MultiControlNetModel) ---------------------------------------------


@pytest.fixture(scope="module")
def multi_manifest(t2i_multi_artifact):
    from diffrt.export.manifest import read_manifest

    return read_manifest(t2i_multi_artifact)


@pytest.fixture(scope="module")
def multi_model(t2i_folder, t2i_controlnet_b):
    return load_text_to_image(t2i_folder, [t2i_folder / "controlnet", t2i_controlnet_b])


def test_two_controlnets_manifest_records_them_in_order(t2i_multi_artifact, multi_manifest, t2i_folder, t2i_controlnet_b):
    from diffrt.atomic import sha256_folder

    source = multi_manifest["source"]
    assert source["controlnets"] == [str((t2i_folder / "controlnet").resolve()), str(t2i_controlnet_b.resolve())]
    assert source["parts"]["controlnet_0"] == sha256_folder(t2i_folder / "controlnet")
    assert source["parts"]["controlnet_1"] == sha256_folder(t2i_controlnet_b) != source["parts"]["controlnet_0"]
    assert "controlnet" not in source["parts"] and set(multi_manifest["components"]) == COMPONENTS - {"vae_encoder"}
    for name in ("unet_controlnet", "controlnet"):
        inputs = {t["name"]: t["dims"] for t in multi_manifest["components"][name]["spec"]["inputs"]}
        assert inputs["controlnet_cond"] == ["batch", 6, "image_height", "image_width"] and inputs["conditioning_scale"] == [2, 5]  # 2 ControlNets, 4 down residuals + mid
        assert multi_manifest["components"][name]["parity"]["onnxruntime"]["passed"], name


def test_controlnet_order_is_in_the_cache_key(t2i_folder, t2i_controlnet_b, t2i_multi_artifact, multi_manifest):
    from diffrt.export.text_to_image import source_hashes

    a, b = t2i_folder / "controlnet", t2i_controlnet_b
    assert source_hashes(t2i_folder, [a, b]) != source_hashes(t2i_folder, [b, a])
    assert source_hashes(t2i_folder, [a]) == {**source_hashes(t2i_folder), "controlnet": multi_manifest["source"]["parts"]["controlnet_0"]}
    again = export_text_to_image(t2i_folder, t2i_multi_artifact, ExportOptions(**T2I_RANGES), [a, b])
    assert again.cache_hit and again.manifest["key"] == multi_manifest["key"]


def test_fused_two_controlnets_equal_diffusers_multicontrolnet(t2i_multi_artifact, multi_manifest, multi_model):
    # Swapped scales give another step: each ControlNet has its own image and scale.
    assert_controlnet_graphs_equal_diffusers(t2i_multi_artifact, multi_manifest, multi_model.unet, multi_model.controlnet,
                                             ([0.5, 1.3], [1.3, 0.5]), seed=8, timestep=601.0)


def test_artifact_refuses_another_set_or_order_of_controlnets(t2i_multi_artifact, t2i_folder, t2i_controlnet_b):
    a, b = t2i_folder / "controlnet", t2i_controlnet_b
    for asked in ([b, a], [a], a):
        with pytest.raises(ArtifactError, match="exported with 2 ControlNets") as info:
            open_text_to_image_pipeline(t2i_multi_artifact, "onnxruntime", controlnet=asked)
        assert "\n" not in str(info.value) and "in this order" in str(info.value)
    assert open_text_to_image_pipeline(t2i_multi_artifact, "onnxruntime", controlnet=[a, b]).num_controlnets == 2


def test_single_controlnet_manifests_from_before_still_read(manifest, t2i_folder):
    from diffrt.export.text_to_image import exported_controlnets

    ((path, digest),) = exported_controlnets(manifest)
    assert path == (t2i_folder / "controlnet").resolve() and digest == manifest["source"]["parts"]["controlnet"]
    old = {**manifest, "source": {**{k: v for k, v in manifest["source"].items() if k != "controlnets"}, "controlnet": str(path)}}
    assert exported_controlnets(old) == [(path, digest)]


# --- cache, tampering ----------------------------------------------------------------------------------


def test_reexport_is_a_cache_hit(t2i_artifact, t2i_folder, manifest, caplog, monkeypatch):
    import logging

    from diffrt import text_to_image_models

    # A hit does no work: the key comes from the configs, and no weight file is read.
    load_frozen = text_to_image_models.load_frozen

    def configs_only(cls, folder, weights=True):
        assert not weights, f"a cache hit read the weights of {folder}"
        return load_frozen(cls, folder, weights)

    monkeypatch.setattr(text_to_image_models, "load_frozen", configs_only)
    with caplog.at_level(logging.INFO, logger="diffrt"):
        result = export_model(t2i_folder, t2i_artifact, ExportOptions(**T2I_ARTIFACT_OPTIONS), controlnets=[str(t2i_folder / "controlnet")])
    assert result.cache_hit and result.manifest["key"] == manifest["key"]
    assert any("cache hit" in r.getMessage() for r in caplog.records)


@pytest.fixture()
def artifact_copy(t2i_artifact, tmp_path):
    return shutil.copytree(t2i_artifact, tmp_path / "copy")


def test_a_changed_weight_is_a_cache_miss(artifact_copy, t2i_folder, tmp_path, monkeypatch):
    """RELIABILITY #11: the key addresses the model's content, not its path: a copy of the folder is a
    hit on the artifact, the same copy with one UNet weight changed a miss, which rebuilds."""
    from safetensors.torch import load_file, save_file

    from diffrt import text_to_image_models

    class Rebuild(Exception):
        pass

    load_frozen = text_to_image_models.load_frozen

    def configs_only(cls, folder, weights=True):
        if weights:  # a miss loads the weights to rebuild: stop there, before the artifact is touched
            raise Rebuild(folder)
        return load_frozen(cls, folder, weights)

    monkeypatch.setattr(text_to_image_models, "load_frozen", configs_only)
    source = shutil.copytree(t2i_folder, tmp_path / "sd")
    options, controlnets = ExportOptions(**T2I_ARTIFACT_OPTIONS), [source / "controlnet"]
    assert export_text_to_image(source, artifact_copy, options, controlnets).cache_hit  # the control
    weights = source / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_out.bias"] = state["conv_out.bias"] + 1e-3
    save_file(state, weights)
    with pytest.raises(Rebuild):
        export_text_to_image(source, artifact_copy, options, controlnets)


def test_corrupted_onnx_is_refused(artifact_copy, manifest):
    path = artifact_copy / "vae_decoder" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"vae_decoder/model.onnx does not match its sha256"):
        artifact_text_to_image_pipeline(artifact_copy, "onnxruntime")
    assert cached_export(artifact_copy, manifest["key"], 0.0) is None  # so a re-export rebuilds instead of trusting it


def test_manifest_hash_mismatch_is_refused(artifact_copy, caplog):
    path = artifact_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    files = manifest["components"]["text_encoder"]["files"]
    files["text_encoder/model.onnx"] = "0" * 64
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="manifest.json was changed after export"):
        open_text_to_image_pipeline(artifact_copy, "onnxruntime")
    del manifest["digest"]  # a manifest from before the digest: the file's own check
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="text_encoder/model.onnx does not match its sha256"):
        open_text_to_image_pipeline(artifact_copy, "onnxruntime")
    # From a review: with the digest gone, an edit of the settings ran without a word; now it is said (a manifest of an
    # older diffrt has none either, so it is not refused).
    assert "manifest.json has no digest (written by an older diffrt, or edited), so its settings" in caplog.text


def test_tampered_tokenizer_and_missing_files_are_refused(artifact_copy):
    (artifact_copy / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ArtifactError, match="merges.txt does not match its sha256"):
        open_text_to_image_pipeline(artifact_copy, "onnxruntime")
    (artifact_copy / "unet_controlnet" / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="unet_controlnet/model.onnx is missing"):
        open_text_to_image_pipeline(artifact_copy, "onnxruntime")


def test_bad_export_arguments(t2i_folder, tmp_path):
    with pytest.raises(DiffrtError, match="multiple of 16"):
        export_text_to_image(t2i_folder, tmp_path / "a", ExportOptions(height=(32, 40, 64)), [])


def test_unmatched_lora_is_refused(t2i_folder, tmp_path):
    from diffrt.atomic import save_safetensors

    bad = tmp_path / "bad_lora.safetensors"
    save_safetensors(bad, {"unet.not_a_module.lora_A.weight": torch.randn(4, 32),
                           "unet.not_a_module.lora_B.weight": torch.randn(32, 4)})
    out = tmp_path / "out"
    with pytest.raises(LoraError, match="not_a_module"):
        export_text_to_image(t2i_folder, out, ExportOptions(loras=[(str(bad), 1.0)]), [])
    assert not (out / "manifest.json").exists()


# --- LoRA baked in -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_files(t2i_folder, tmp_path_factory):
    from diffrt.tiny import tiny_lora_files

    return {"a": tiny_lora_files(t2i_folder, tmp_path_factory.mktemp("lora_a"), seed=1),
            "b": tiny_lora_files(t2i_folder, tmp_path_factory.mktemp("lora_b"), seed=2)}


def diffusers_fused(folder, loras):
    """diffusers' own result: load each file as an adapter, weight them, fuse_lora."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(path, adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # diffusers loading two adapters
@pytest.mark.parametrize("which", [[("a", "peft", 1.0)], [("a", "kohya", 0.8)], [("a", "peft", 0.7), ("b", "kohya", 0.4)]],
                         ids=["peft", "kohya", "two-loras"])
def test_lora_baked_export_equals_diffusers_fuse_lora(t2i_folder, lora_files, tmp_path, which):
    loras = [(str(lora_files[k][fmt]), scale) for k, fmt, scale in which]
    out = tmp_path / "artifact"
    result = export_text_to_image(t2i_folder, out, ExportOptions(batch=(1, 2, 2), loras=loras), [])
    assert [(entry["sha256"], entry["scale"]) for entry in result.manifest["loras"]] == [
        (sha256_file(p), s) for p, s in loras]
    assert all(entry["modules"] > 0 for entry in result.manifest["loras"])
    fused, base = diffusers_fused(t2i_folder, loras), load_text_to_image(t2i_folder)
    manifest = result.manifest
    for name, reference in (("text_encoder", fused.text_encoder), ("unet", fused.unet)):
        backend = ort(out, manifest, name)
        feed = backend.spec.example_feed(seed=3, batch=2)
        with torch.no_grad():
            if name == "text_encoder":
                feed["clip_skip"] = torch.zeros_like(feed["clip_skip"])  # the last hidden state, which the reference returns
                expected, before = reference(feed["input_ids"])[0], base.text_encoder(feed["input_ids"])[0]
            else:
                args = (feed["sample"], feed["timestep"], feed["encoder_hidden_states"])
                expected, before = reference(*args).sample, base.unet(*args).sample
        got = next(iter(backend.run(feed).values()))
        assert compare(expected, got).max_rel <= TOL, name
        assert compare(before, got).max_rel > 100 * TOL, f"{name}: the LoRA changed nothing"

    if len(which) == 2:
        # Guidance through the PyTorch UNet fuses the same LoRAs at the same scales: it agrees with the
        # exported UNet (checked on the first guided step), so this runs without error.
        from diffrt.runtime.guidance import color_guidance

        pipe = open_text_to_image_pipeline(out, "onnxruntime")
        pipe("a cat", num_inference_steps=2, guidance_scale=3.0, seed=0, output_type="pt",
             guidance=[color_guidance("#ff0000", 10.0, mode="through_unet")])
    else:
        other = lora_files["b"]["peft"]
        with pytest.raises(ArtifactError, match="LoRA baked in at export"):
            open_text_to_image_pipeline(out, "onnxruntime", loras=[(other, 1.0)])
        with pytest.raises(ArtifactError, match="exported without a ControlNet"):
            open_text_to_image_pipeline(out, "onnxruntime", controlnet=t2i_folder / "controlnet")


def test_weight_map_for_refit(artifact_copy, model):
    """For `diffrt refit`: the text encoder's weights are all found in its ONNX; in the fused graph no
    ControlNet initializer is taken for a UNet weight. (The tiny ControlNet is made from the UNet, so
    some constant-folded copies are equal and stay ambiguous: refit refuses a LoRA on those.)"""
    from diffrt.export.refit import read_weight_map
    from diffrt.export.text_to_image import _add_weight_map

    for name in ("text_encoder", "unet_controlnet"):
        entry = {"files": {}}
        _add_weight_map(artifact_copy, name, model, entry)
        assert f"{name}/weight_map.json" in entry["files"]
    text = read_weight_map(artifact_copy / "text_encoder" / "model.onnx")
    assert text["weights"] and not text["unlocated"] and not text["ambiguous"]
    # A LoRA's weights: the Linear ones, not the embedding tables, which are 2-D too (refit would have patched them).
    params = text["params"]["text_encoder"]
    assert "encoder.layers.0.self_attn.q_proj.weight" in params
    assert not [p for p in params if "embedding" in p]
    # A map of the format before (which listed the tables) is not trusted: refit makes a new one or asks to re-export.
    map_path = artifact_copy / "text_encoder" / "weight_map.json"
    map_path.write_text(json.dumps({**text, "format": 1}))
    assert read_weight_map(artifact_copy / "text_encoder" / "model.onnx") is None
    fused = read_weight_map(artifact_copy / "unet_controlnet" / "model.onnx")
    for name, e in fused["weights"].items():
        if name.startswith("controlnet."):
            assert e["component"] == "controlnet", name
        if name.startswith("unet."):
            assert e["component"] == "unet", name


def test_weight_map_for_refit_with_two_controlnets(t2i_multi_artifact, multi_model, tmp_path):
    """Two ControlNets are one MultiControlNetModel (nets.0..., nets.1...): every initializer of
    theirs maps to that ControlNet's own parameter, never to the UNet or the other ControlNet."""
    from diffrt.export.refit import read_weight_map
    from diffrt.export.text_to_image import _add_weight_map

    copy = shutil.copytree(t2i_multi_artifact, tmp_path / "copy")
    _add_weight_map(copy, "unet_controlnet", multi_model, {"files": {}})
    fused = read_weight_map(copy / "unet_controlnet" / "model.onnx")
    nets = set()
    for name, e in fused["weights"].items():
        if name.startswith("controlnet.nets."):
            net = name.split(".")[2]
            assert e["component"] == "controlnet" and e["param"].startswith(f"nets.{net}."), name
            nets.add(net)
        if name.startswith("unet."):
            assert e["component"] == "unet", name
    assert nets == {"0", "1"}


# --- the plain UNet (no ControlNet), fp16, interrupted exports ----------------------------------------


@pytest.fixture(scope="module")
def plain_artifact(t2i_folder, tmp_path_factory):
    """t2i_folder exported without a ControlNet: text_encoder, unet, vae_decoder (fp32 ONNX)."""
    out = tmp_path_factory.mktemp("plain") / "artifact"
    export_text_to_image(t2i_folder, out, ExportOptions(**T2I_RANGES), [])
    return out


def test_an_export_for_one_image_with_cfg_decodes_it(t2i_folder, tmp_path):
    """The bug (a review's): --batch 2:2:2 (a static UNet for one image with CFG) was applied to the VAE too, which
    decodes one row per image: the call ran every step, then the decoder refused batch 1. The text encoder encodes one
    row per prompt (two with CFG), so two images of one prompt without CFG need its batch 1."""
    options = ExportOptions(**{**T2I_RANGES, "batch": (2, 2, 2)}, verify=False, vae_encoder=True)
    result = export_text_to_image(t2i_folder, tmp_path / "artifact", options, [])
    for name in ("vae_decoder", "vae_encoder"):
        assert result.manifest["components"][name]["spec"]["ranges"]["batch"] == [1, 2, 2]
    assert result.manifest["components"]["unet"]["spec"]["ranges"]["batch"] == [2, 2, 2]
    assert result.manifest["components"]["text_encoder"]["spec"]["ranges"]["batch"] == [1, 2, 2]
    pipe = artifact_text_to_image_pipeline(tmp_path / "artifact", "onnxruntime", "cpu")
    assert len(pipe("a cat", num_inference_steps=1, guidance_scale=5.0).images) == 1
    assert len(pipe("a cat", num_inference_steps=1, guidance_scale=1.0, num_images_per_prompt=2).images) == 2  # no CFG


def test_plain_unet_matches_pytorch_across_batch_and_resolution(plain_artifact, model):
    from diffrt.export.manifest import read_manifest

    manifest = read_manifest(plain_artifact)
    assert set(manifest["components"]) == {"text_encoder", "unet", "vae_decoder"} and manifest["pipeline"]["unet"] == "unet"
    backend = ort(plain_artifact, manifest, "unet")
    reference = TorchBackend(model.module("unet"), backend.spec)
    for i, sizes in enumerate(sizes_inside_ranges("unet")):  # batch 1..3, latent 4x8, 8x4, 6x6
        feed = backend.spec.example_feed(seed=200 + i, batch=sizes["batch"], height=sizes["height"], width=sizes["width"])
        expected, got = reference.run(feed)["noise_pred"], backend.run(feed)["noise_pred"]
        assert got.shape == expected.shape == (sizes["batch"], 4, sizes["height"], sizes["width"])
        assert compare(expected, got).max_rel <= TOL, sizes


def test_fp16_export_keeps_the_vae_decoder_fp32(t2i_folder, plain_artifact, tmp_path):
    """RELIABILITY #5: the tiny VAE asks for force_upcast, so an fp16 export keeps its decoder in fp32;
    decoding fixed latents with the fp16 and the fp32 export gives finite, equal images."""
    from diffrt.export.tensorrt import onnx_float_type

    out = tmp_path / "fp16"
    manifest = export_text_to_image(t2i_folder, out, ExportOptions(precision="fp16", **T2I_RANGES), []).manifest
    comps = manifest["components"]
    assert manifest["pipeline"]["vae_force_upcast"] is True
    assert comps["vae_decoder"]["precision"] == "fp32" and onnx_float_type(out / "vae_decoder" / "model.onnx") == "fp32"
    assert comps["unet"]["precision"] == "fp16" and onnx_float_type(out / "unet" / "model.onnx") == "fp16"
    assert comps["unet"]["parity"]["onnxruntime"]["passed"]  # fp16 checked against PyTorch fp32 at fp16 tolerance
    # The timestep stays fp32 (diffusers' time embedding takes it so): fp16 would round 998.73 to 998.5.
    import onnx

    types = {v.name: v.type.tensor_type.elem_type for v in onnx.load(str(out / "unet" / "model.onnx")).graph.input}
    assert types == {"sample": 10, "timestep": 1, "encoder_hidden_states": 10}
    assert {"name": "timestep", "dims": ["batch"], "dtype": "float32", "high": 10, "pinned": True} in comps["unet"]["spec"]["inputs"]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 3.0
    images = [ort(folder, m, "vae_decoder").run({"latent": latents})["image"]
              for folder, m in ((out, manifest), (plain_artifact, json.loads((plain_artifact / "manifest.json").read_text())))]
    assert all(torch.isfinite(x).all() for x in images)
    assert compare(images[1], images[0]).max_rel <= TOL


def test_a_vae_that_overflows_in_fp16_decodes_finite_from_an_fp16_export(t2i_folder, tmp_path):
    """RELIABILITY #5 where the hazard is real: a VAE whose decoder's activations pass fp16's 65504 (its first
    convolution scaled up) decodes to inf in fp16, black images; an fp16 export keeps that decoder in fp32, as
    the VAE's force_upcast asks, and decodes the same latents finite, as eager fp32 does."""
    import shutil

    from diffusers import AutoencoderKL
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(t2i_folder, tmp_path / "sd", ignore=shutil.ignore_patterns("controlnet"))
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["decoder.conv_in.weight"] = state["decoder.conv_in.weight"] * 1e5
    save_file(state, weights)
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = vae.decode(latents).sample
        assert torch.isfinite(expected).all()
        assert not torch.isfinite(vae.half().decode(latents.half()).sample).all()  # the hazard, in PyTorch fp16
    out = export_text_to_image(folder, tmp_path / "fp16", ExportOptions(precision="fp16", verify=False, **T2I_RANGES), []).folder
    image = ort(out, mf.read_manifest(out), "vae_decoder").run({"latent": latents})["image"]
    assert torch.isfinite(image).all() and compare(expected, image).max_rel <= TOL


def interrupt_export_at(monkeypatch, n: int) -> list[str]:
    """Stop the export (KeyboardInterrupt, as if the process were stopped) when it starts its n-th ONNX
    export; returns the list of components it started, in order."""
    from diffrt.export import artifact

    real, calls = artifact.export_onnx, []

    def dies(module, spec, *args, **kwargs):
        calls.append(spec.name)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(module, spec, *args, **kwargs)

    monkeypatch.setattr(artifact, "export_onnx", dies)
    return calls


def test_an_interrupted_rebuild_leaves_the_previous_export_running_and_a_rerun_rebuilds(plain_artifact, t2i_folder, tmp_path,
                                                                                        monkeypatch):
    """The bug (a review's): a rebuild removed the previous manifest before it began, so one stopped or failed midway left
    an artifact nothing would open. The new export is staged beside the old, which runs until it is replaced."""
    from diffrt.export.manifest import read_manifest

    folder = shutil.copytree(plain_artifact, tmp_path / "copy")
    old = read_manifest(folder)
    before = artifact_text_to_image_pipeline(folder, "onnxruntime")("a cat", num_inference_steps=1, seed=0, output_type="pt").images
    options = ExportOptions(**{**T2I_RANGES, "batch": (1, 2, 2)}, verify=False)  # another export: a rebuild
    interrupt_export_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        export_text_to_image(t2i_folder, folder, options, [])
    assert read_manifest(folder) == old and cached_export(folder, old["key"], 0.0) is not None
    after = artifact_text_to_image_pipeline(folder, "onnxruntime")("a cat", num_inference_steps=1, seed=0, output_type="pt").images
    assert torch.equal(before, after)

    monkeypatch.undo()  # the real export_onnx again
    result = export_text_to_image(t2i_folder, folder, options, [])
    assert not result.cache_hit and result.manifest["key"] != old["key"]
    assert result.manifest["components"]["unet"]["spec"]["ranges"]["batch"] == [1, 2, 2]
    artifact_text_to_image_pipeline(folder, "onnxruntime")
    assert export_text_to_image(t2i_folder, folder, options, []).cache_hit


def test_a_tokenizer_file_the_new_source_lacks_does_not_stay_in_the_artifact(t2i_folder, tmp_path):
    """The bug: a rebuild copied the source's tokenizer files over the old ones, so a file an earlier
    export had copied and the new source lacks (here tokenizer.json) stayed in the artifact, unlisted
    in its manifest, and the tokenizer read it in preference to the new vocab.json."""
    from diffrt.export.manifest import read_manifest
    from diffrt.text_to_image_models import load_tokenizer

    source, out = shutil.copytree(t2i_folder, tmp_path / "sd"), tmp_path / "artifact"
    options = ExportOptions(**T2I_RANGES, verify=False)
    export_text_to_image(source, out, options, [])
    assert (out / "tokenizer" / "tokenizer.json").is_file()  # the control: the first export copied it
    (source / "tokenizer" / "tokenizer.json").unlink()
    vocab = json.loads((source / "tokenizer" / "vocab.json").read_text())
    vocab["a</w>"], vocab["h"] = vocab["h"], vocab["a</w>"]  # a retrained vocabulary: other ids
    (source / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    assert not export_text_to_image(source, out, options, []).cache_hit
    listed = set(read_manifest(out)["pipeline"]["tokenizer"]["files"])
    assert {p.name for p in (out / "tokenizer").iterdir()} == listed and "tokenizer.json" not in listed
    ids = load_tokenizer(source / "tokenizer")("a photo").input_ids
    assert load_tokenizer(out / "tokenizer")("a photo").input_ids == ids != load_tokenizer(t2i_folder / "tokenizer")("a photo").input_ids


def add_token(source, token: str) -> int:
    """A textual-inversion token, as a transformers-4 save writes one: added_tokens.json, and a text encoder whose
    embedding has its row (a tokenizer of more tokens than the encoder embeds is refused at open)."""
    from transformers import CLIPTextModel

    token_id = len(json.loads((source / "tokenizer" / "vocab.json").read_text()))
    (source / "tokenizer" / "added_tokens.json").write_text(json.dumps({token: token_id}))
    encoder = CLIPTextModel.from_pretrained(source / "text_encoder")
    encoder.resize_token_embeddings(token_id + 1)
    encoder.save_pretrained(source / "text_encoder")
    return token_id


def test_the_artifact_tokenizes_with_the_sources_added_tokens(unverified_plain, t2i_folder, tmp_path):
    """The bug: the export copied a fixed list of tokenizer files, so a transformers-4 folder's
    added_tokens.json (a textual-inversion token) was left behind and the exported pipeline split the
    token into pieces where PyTorch read it as one."""
    from diffrt.text_to_image_models import load_tokenizer

    source, out = shutil.copytree(t2i_folder, tmp_path / "sd"), shutil.copytree(unverified_plain, tmp_path / "artifact")
    (source / "tokenizer" / "tokenizer.json").unlink()  # the slow tokenizer's files, as such folders have them
    token_id = add_token(source, "<sks-style>")
    prompt = "a photo in <sks-style>"
    ids = load_tokenizer(source / "tokenizer")(prompt).input_ids
    assert token_id in ids  # the control: the source reads the added token as one
    assert not export_text_to_image(source, out, ExportOptions(**T2I_RANGES, verify=False), []).cache_hit
    pipe = open_text_to_image_pipeline(out, "onnxruntime")
    assert pipe.tokenizer(prompt).input_ids == ids


def test_an_artifact_made_when_added_tokens_were_left_behind_gets_them_without_a_component_rebuilt(
        unverified_plain, t2i_folder, tmp_path, monkeypatch):
    """An artifact from before the fix has no added_tokens.json but the key of its day, which held no tokenizer file
    names: no hit now, and its rebuild exports no component, only copies the tokenizer (a review's finding: such an
    artifact stayed a hit, and 're-export' changed nothing)."""
    from diffrt.export.manifest import read_manifest, write_manifest

    source, out = shutil.copytree(t2i_folder, tmp_path / "sd"), tmp_path / "artifact"
    add_token(source, "<sks-style>")
    options = ExportOptions(**T2I_RANGES, verify=False)
    export_text_to_image(source, out, options, [])
    manifest = read_manifest(out)  # made into what the earlier export wrote: the file missing, another key
    (out / "tokenizer" / "added_tokens.json").unlink()
    manifest["pipeline"]["tokenizer"]["files"].pop("added_tokens.json")
    write_manifest(out, {**manifest, "key": "0" * 64})
    names = exported_names(monkeypatch)
    result = export_text_to_image(source, out, options, [])
    assert not result.cache_hit and names == []
    assert (out / "tokenizer" / "added_tokens.json").is_file() and "added_tokens.json" in result.manifest["pipeline"]["tokenizer"]["files"]


def test_a_source_moved_since_export_is_a_hit_that_records_its_new_path(unverified_plain, t2i_folder, tmp_path):
    """The bug: a re-export from the model's new place was a cache hit that kept the old path, which every
    PyTorch fallback then looked for (here the eager backend over the artifact)."""
    from diffrt.export.manifest import read_manifest

    source, out = shutil.copytree(t2i_folder, tmp_path / "moved"), shutil.copytree(unverified_plain, tmp_path / "artifact")
    assert export_text_to_image(source, out, ExportOptions(**T2I_RANGES, verify=False), []).cache_hit
    recorded = read_manifest(out)["source"]
    assert recorded["path"] == str(source.resolve()) and recorded["controlnets"] == []


@pytest.mark.parametrize("dropped", ["tokenizer/tokenizer.json", "unet_controlnet/model.onnx.data"])
def test_a_file_the_loaders_would_read_unlisted_in_the_manifest_is_refused(artifact_copy, t2i_folder, dropped):
    """The bug: only the files a manifest lists were checked, so a tokenizer.json (which the tokenizer
    reads before vocab.json) or external weights dropped beside a graph were used, unchecked."""
    target = artifact_copy / dropped
    if dropped.startswith("tokenizer/"):
        target.unlink()  # an artifact whose tokenizer was copied without tokenizer.json
        manifest = json.loads((artifact_copy / "manifest.json").read_text())
        del manifest["pipeline"]["tokenizer"]["files"]["tokenizer.json"]
        mf.write_manifest(artifact_copy, manifest)
        open_text_to_image_pipeline(artifact_copy, "onnxruntime")  # the control: it opens
        shutil.copy(t2i_folder / "tokenizer" / "tokenizer.json", target)
        words = r"tokenizer/tokenizer.json is not listed in manifest.json, and the tokenizer would read it"
    else:
        target.write_bytes(b"\0" * 64)
        words = r"lists no sha256 for unet_controlnet/model.onnx.data, so it cannot be checked"
    with pytest.raises(ArtifactError, match=words):
        open_text_to_image_pipeline(artifact_copy, "onnxruntime")


def test_a_rebuild_without_the_controlnet_leaves_no_controlnet_folders(t2i_folder, tmp_path):
    """The bug: a rebuild replaced the folders of the components it exported and left the others, so
    dropping the ControlNet left controlnet/ and unet_controlnet/ (gigabytes at SD size) that no
    manifest names."""
    out, options = tmp_path / "artifact", ExportOptions(**T2I_RANGES, verify=False)
    export_text_to_image(t2i_folder, out, options, [t2i_folder / "controlnet"])
    assert (out / "controlnet" / "model.onnx").is_file() and (out / "unet_controlnet" / "model.onnx").is_file()  # the control
    assert not export_text_to_image(t2i_folder, out, options, []).cache_hit
    assert {p.name for p in out.iterdir()} == {"manifest.json", "text_encoder", "unet", "vae_decoder", "tokenizer"}
    artifact_text_to_image_pipeline(out, "onnxruntime")


# --- a rebuild keeps the components whose inputs are unchanged ------------------------------------------


@pytest.fixture(scope="module")
def unverified_plain(t2i_folder, tmp_path_factory):
    """t2i_folder exported without a ControlNet, --no-verify: text_encoder, unet, vae_decoder."""
    out = tmp_path_factory.mktemp("unverified_plain") / "artifact"
    export_text_to_image(t2i_folder, out, ExportOptions(**T2I_RANGES, verify=False), [])
    return out


def exported_names(monkeypatch) -> list[str]:
    """The components exported from now on, in order (a spy on the ONNX export every component goes through)."""
    from diffrt.export import artifact

    real, names = artifact.export_onnx, []

    def spy(module, spec, *args, **kwargs):
        names.append(spec.name)
        return real(module, spec, *args, **kwargs)

    monkeypatch.setattr(artifact, "export_onnx", spy)
    return names


def reused(caplog) -> list[str]:
    return [r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("reusing ")]


def file_hashes(manifest) -> dict:
    return {name: comp["files"] for name, comp in manifest["components"].items()}


def test_adding_the_vae_encoder_exports_it_alone(unverified_plain, t2i_folder, tmp_path, monkeypatch, caplog):
    import logging
    from dataclasses import replace

    out = shutil.copytree(unverified_plain, tmp_path / "artifact")
    options = ExportOptions(**T2I_RANGES, verify=False, vae_encoder=True)
    fresh = export_text_to_image(t2i_folder, tmp_path / "fresh", options, [])  # the reference: all four exported
    names = exported_names(monkeypatch)
    with caplog.at_level(logging.INFO, logger="diffrt"):
        result = export_text_to_image(t2i_folder, out, options, [])
    assert not result.cache_hit and names == ["vae_encoder"]
    assert reused(caplog) == ["text_encoder", "unet", "vae_decoder"]
    assert any(r.getMessage() == "reusing unet (unchanged)" for r in caplog.records)
    # The same artifact as an export from scratch: the key, and every component's files.
    assert result.manifest["key"] == fresh.manifest["key"]
    assert file_hashes(result.manifest) == file_hashes(fresh.manifest)
    assert {p.name for p in out.iterdir()} == {p.name for p in fresh.folder.iterdir()}  # no rebuild record left
    artifact_text_to_image_pipeline(out, "onnxruntime", "cpu")("a cat", num_inference_steps=1)
    assert export_text_to_image(t2i_folder, out, options, []).cache_hit and names == ["vae_encoder"]
    # A verified entry stands in for an unverified request, never the reverse (cached_export's rule).
    names.clear()
    assert not export_text_to_image(t2i_folder, out, replace(options, verify=True), []).cache_hit
    assert names == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    names.clear()
    assert not export_text_to_image(t2i_folder, out, replace(options, vae_encoder=False), []).cache_hit
    assert names == []


def unet_only_lora(path, out):
    """A copy of a peft LoRA file with its text encoder layers left out."""
    from safetensors import safe_open

    from diffrt.atomic import save_safetensors

    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys() if k.startswith("unet.")}, f.metadata()
    save_safetensors(out, tensors, metadata)
    return out


def test_a_baked_lora_rebuilds_only_what_it_patches(unverified_plain, t2i_folder, lora_files, tmp_path, monkeypatch):
    out = shutil.copytree(unverified_plain, tmp_path / "artifact")
    names = exported_names(monkeypatch)
    unet_lora = unet_only_lora(lora_files["a"]["peft"], tmp_path / "unet_lora.safetensors")
    result = export_text_to_image(t2i_folder, out, ExportOptions(**T2I_RANGES, verify=False, loras=[(str(unet_lora), 1.0)]), [])
    assert names == ["unet"] and result.manifest["loras"][0]["modules"] > 0  # the text encoder is as it was
    names.clear()
    loras = [(str(lora_files["a"]["peft"]), 0.7)]
    result = export_text_to_image(t2i_folder, out, ExportOptions(**T2I_RANGES, verify=False, loras=loras), [])
    assert names == ["text_encoder", "unet"]  # the VAE decoder takes no LoRA: kept
    fresh = export_text_to_image(t2i_folder, tmp_path / "fresh", ExportOptions(**T2I_RANGES, verify=False, loras=loras), [])
    assert file_hashes(result.manifest) == file_hashes(fresh.manifest) and result.manifest["key"] == fresh.manifest["key"]
    assert result.manifest["onnx_loras"] == fresh.manifest["onnx_loras"]
    names.clear()
    assert not export_text_to_image(t2i_folder, out, ExportOptions(**T2I_RANGES, verify=False), []).cache_hit
    assert names == ["text_encoder", "unet"]  # back to base weights
    artifact_text_to_image_pipeline(out, "onnxruntime", "cpu")("a cat", num_inference_steps=1)


def test_a_corrupted_component_is_rebuilt_not_reused(unverified_plain, t2i_folder, tmp_path, monkeypatch, caplog):
    import logging

    from diffrt.export.manifest import verify_files

    out = shutil.copytree(unverified_plain, tmp_path / "artifact")
    path = out / "vae_decoder" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    names = exported_names(monkeypatch)
    with caplog.at_level(logging.INFO, logger="diffrt"):
        result = export_text_to_image(t2i_folder, out, ExportOptions(**T2I_RANGES, verify=False, vae_encoder=True), [])
    assert names == ["vae_decoder", "vae_encoder"] and reused(caplog) == ["text_encoder", "unet"]
    assert any("not reusing vae_decoder" in r.getMessage() and "does not match its sha256" in r.getMessage() for r in caplog.records)
    verify_files(out, result.manifest)
    artifact_text_to_image_pipeline(out, "onnxruntime", "cpu")


def test_an_artifact_from_before_component_keys_is_a_hit_and_rebuilt_whole(unverified_plain, t2i_folder, tmp_path, monkeypatch):
    out = shutil.copytree(unverified_plain, tmp_path / "artifact")
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    for comp in manifest["components"].values():
        del comp["component_key"]
    del manifest["digest"]  # nor had it a digest
    path.write_text(json.dumps(manifest))
    names = exported_names(monkeypatch)
    options = ExportOptions(**T2I_RANGES, verify=False)
    assert export_text_to_image(t2i_folder, out, options, []).cache_hit  # the artifact key is what it was
    result = export_text_to_image(t2i_folder, out, ExportOptions(**T2I_RANGES, verify=False, vae_encoder=True), [])
    assert names == ["text_encoder", "unet", "vae_decoder", "vae_encoder"] and not result.cache_hit
    assert all("component_key" in comp for comp in result.manifest["components"].values())


def test_dropping_the_vae_encoder_removes_its_folder_and_keeps_the_rest(t2i_folder, tmp_path, monkeypatch):
    out = tmp_path / "artifact"
    export_text_to_image(t2i_folder, out, ExportOptions(**T2I_RANGES, verify=False, vae_encoder=True), [])
    assert (out / "vae_encoder" / "model.onnx").is_file()  # the control
    names = exported_names(monkeypatch)
    result = export_text_to_image(t2i_folder, out, ExportOptions(**T2I_RANGES, verify=False), [])
    assert not result.cache_hit and names == []
    assert {p.name for p in out.iterdir()} == {"manifest.json", "text_encoder", "unet", "vae_decoder", "tokenizer"}
    assert set(result.manifest["components"]) == {"text_encoder", "unet", "vae_decoder"}
    artifact_text_to_image_pipeline(out, "onnxruntime", "cpu")("a cat", num_inference_steps=1)


def test_a_killed_rebuild_resumes_from_what_it_finished_and_trusts_nothing_else(unverified_plain, t2i_folder, tmp_path, monkeypatch):
    """A rebuild stages its components beside the previous export; the rebuild record (cache.REBUILD) keeps the
    components kept and those finished, so a rerun after a kill exports only the rest, and a component
    whose files changed since (here: one the killed run was writing, and one edited) is rebuilt."""
    from diffrt.export import cache

    out = shutil.copytree(unverified_plain, tmp_path / "artifact")
    old = mf.read_manifest(out)
    options = ExportOptions(**{**T2I_RANGES, "batch": (1, 2, 2)}, verify=False, vae_encoder=True)  # every spec changes
    calls = interrupt_export_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        export_text_to_image(t2i_folder, out, options, [])
    assert calls == ["text_encoder", "unet", "vae_decoder"] and mf.read_manifest(out) == old  # the previous export runs
    assert (out / cache.REBUILD).is_file()
    artifact_text_to_image_pipeline(out, "onnxruntime")
    onnx = out / cache.STAGE / "unet" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")  # changed since the record was written: never trusted

    names = exported_names(monkeypatch)
    result = export_text_to_image(t2i_folder, out, options, [])
    assert names == ["unet", "vae_decoder", "vae_encoder"] and not (out / cache.REBUILD).exists()
    assert result.manifest["components"]["text_encoder"]["spec"]["ranges"]["batch"] == [1, 2, 2]
    artifact_text_to_image_pipeline(out, "onnxruntime", "cpu")("a cat", num_inference_steps=1)
    assert export_text_to_image(t2i_folder, out, options, []).cache_hit


def test_a_rebuild_stopped_while_it_moves_into_place_is_finished_by_a_rerun(unverified_plain, t2i_folder, tmp_path, monkeypatch):
    """The moves that replace the previous export are renames: a kill among them leaves no manifest (the folder is
    named unfinished), and the rerun finds every component, moved or still staged, by the record, and exports none."""
    from diffrt.export import cache

    out = shutil.copytree(unverified_plain, tmp_path / "artifact")
    options = ExportOptions(**T2I_RANGES, verify=False, vae_encoder=True)  # the encoder added: the rest kept
    real, moves = cache._move, []

    def stops(src, dst):
        moves.append(Path(dst).name)
        if len(moves) == 3:  # text_encoder out of the way and the new one in place; then the kill
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(cache, "_move", stops)
    with pytest.raises(KeyboardInterrupt):
        export_text_to_image(t2i_folder, out, options, [])
    monkeypatch.undo()
    assert moves == ["text_encoder", "text_encoder", "tokenizer"] and not (out / mf.MANIFEST).exists()
    with pytest.raises(ArtifactError, match="did not finish"):
        artifact_text_to_image_pipeline(out, "onnxruntime")

    names = exported_names(monkeypatch)
    result = export_text_to_image(t2i_folder, out, options, [])
    assert names == [] and not result.cache_hit and not (out / cache.STAGE).exists()
    assert {p.name for p in out.iterdir()} == {"manifest.json", "text_encoder", "unet", "vae_decoder", "vae_encoder", "tokenizer"}
    fresh = export_text_to_image(t2i_folder, tmp_path / "fresh", options, [])
    assert file_hashes(result.manifest) == file_hashes(fresh.manifest)
    artifact_text_to_image_pipeline(out, "onnxruntime", "cpu")("a cat", num_inference_steps=1)


def test_a_pixel_export_over_a_text_to_image_artifact_leaves_none_of_it(unverified_plain, tmp_path):
    """From a review: the rebuild owned the component folders, not the tokenizer, which stayed, unnamed."""
    from diffrt.export.artifact import export_pixel_model

    out = shutil.copytree(unverified_plain, tmp_path / "artifact")
    export_pixel_model(None, out, ExportOptions(batch=(1, 2, 4), verify=False))
    assert {p.name for p in out.iterdir()} == {"manifest.json", "unet"}


def test_a_triton_repository_takes_nothing_an_unfinished_export_left(unverified_plain, tmp_path):
    from diffrt.export import cache
    from diffrt.serve.triton_repo import _place

    src = shutil.copytree(unverified_plain, tmp_path / "artifact")
    (src / cache.STAGE / "unet").mkdir(parents=True)
    (src / cache.STAGE / "unet" / "model.onnx").write_bytes(b"stale")
    (src / cache.REBUILD).write_text("{}")
    _place(src, tmp_path / "repo")
    placed = {p.relative_to(tmp_path / "repo").parts[0] for p in (tmp_path / "repo").rglob("*")}
    assert "manifest.json" in placed and "unet" in placed and not placed & {cache.STAGE, cache.REBUILD}


@pytest.mark.parametrize("held, asked, refits", [([], [], False), ([], ["a"], True), (["a"], [], True), (["a"], ["a"], True)],
                         ids=["base-kept-base", "base-asked-lora", "lora-kept-asked-base", "lora-kept-lora"])
def test_a_kept_engine_is_refit_to_the_exports_loras(tmp_path, monkeypatch, held, asked, refits):
    """TensorRT exports keep engines whose build inputs are unchanged, and an engine kept from an export with
    LoRA holds that LoRA: it is refit (from the base weights) to the new export's LoRAs, or back to base,
    before the manifest is written; engines at base with no LoRA asked for are left alone. (CPU: the refit is a spy.)"""
    from diffrt.export import artifact, refit

    calls = []
    monkeypatch.setattr(refit, "refit_components", lambda out, manifest, loras: calls.append(list(loras)))
    engine = {"tensorrt": "10", **({"loras": [{"path": "a", "sha256": "0" * 64, "scale": 1.0}]} if held else {})}
    manifest = {"components": {"unet": {"engine": engine, "files": {}}, "vae_decoder": {"engine": {"loras": []}, "files": {}}}}
    options = ExportOptions(backend="tensorrt", loras=[(p, 1.0) for p in asked])
    artifact.refit_before_manifest(tmp_path, manifest, options)
    assert calls == ([[(p, 1.0) for p in asked]] if refits else [])
    artifact.refit_before_manifest(tmp_path, manifest, ExportOptions(loras=[("a", 1.0)]))  # ONNX: baked, never refit
    assert len(calls) == int(refits)


def test_a_killed_rebuild_still_keeps_the_components_it_kept_but_had_not_reached(unverified_plain, t2i_folder, lora_files,
                                                                                   tmp_path, monkeypatch):
    """A UNet LoRA and the encoder added: the text encoder and VAE decoder are kept, the UNet and encoder exported;
    killed while it exports the encoder (after the UNet), the rerun exports the encoder alone: the record names the
    kept VAE decoder though the loop had not reached it."""
    from diffrt.export import cache

    out = shutil.copytree(unverified_plain, tmp_path / "artifact")
    unet_lora = unet_only_lora(lora_files["a"]["peft"], tmp_path / "unet_lora.safetensors")
    options = ExportOptions(**T2I_RANGES, verify=False, vae_encoder=True, loras=[(str(unet_lora), 1.0)])
    calls = interrupt_export_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        export_text_to_image(t2i_folder, out, options, [])
    assert calls == ["unet", "vae_encoder"] and (out / cache.REBUILD).is_file()
    monkeypatch.undo()
    names = exported_names(monkeypatch)
    result = export_text_to_image(t2i_folder, out, options, [])
    assert names == ["vae_encoder"] and not (out / cache.REBUILD).exists()
    fresh = export_text_to_image(t2i_folder, tmp_path / "fresh", options, [])
    assert file_hashes(result.manifest) == file_hashes(fresh.manifest)


def test_an_old_folder_a_rebuild_cannot_remove_is_named(t2i_folder, tmp_path, monkeypatch, caplog):
    """Dropping the encoder, where its old folder cannot be deleted: the rebuild says so (no manifest or record
    names it afterwards), instead of leaving it behind unannounced."""
    import logging

    out = tmp_path / "artifact"
    export_text_to_image(t2i_folder, out, ExportOptions(**T2I_RANGES, verify=False, vae_encoder=True), [])
    monkeypatch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)  # every delete fails
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        export_text_to_image(t2i_folder, out, ExportOptions(**T2I_RANGES, verify=False), [])
    assert "could not remove .staging/" in caplog.text  # the old vae_encoder/ was moved there


def test_tokenizer_entries_stay_in_the_tokenizer_folder(t2i_artifact, tmp_path):
    """A manifest's tokenizer files are opened by name in its folder: '../' is refused when the manifest is read, a
    name export copies as it is (spaces, brackets) is not."""
    import shutil

    from diffrt.errors import ArtifactError
    from diffrt.export import manifest as mf

    out = tmp_path / "artifact"
    shutil.copytree(t2i_artifact, out)
    manifest = mf.read_manifest(out)
    files = manifest["pipeline"]["tokenizer"]["files"]
    mf.write_manifest(out, {**manifest, "pipeline": {**manifest["pipeline"], "tokenizer": {
        **manifest["pipeline"]["tokenizer"], "files": {**files, "vocab (1).json": "00"}}}})
    mf.read_manifest(out)
    mf.write_manifest(out, {**manifest, "pipeline": {**manifest["pipeline"], "tokenizer": {
        **manifest["pipeline"]["tokenizer"], "files": {**files, "../../outside.json": "00"}}}})
    with pytest.raises(ArtifactError, match="names tokenizer files outside a folder of the artifact"):
        mf.read_manifest(out)
