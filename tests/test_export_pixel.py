"""Pixel-model export: parity, the content-addressed cache, and refusal of anything stale or corrupt."""

from __future__ import annotations

import json

import pytest
import torch

from diffrt.errors import ArtifactError, LoraError
from diffrt.export import manifest as mf
from diffrt.export.artifact import ExportOptions, export_pixel_model
from diffrt.runtime.loading import artifact_pixel_pipeline

OPTIONS = ExportOptions(batch=(1, 2, 8))


@pytest.fixture()
def artifact(classemb_model_dir, tmp_path):
    out = tmp_path / "artifact"
    export_pixel_model(classemb_model_dir, out, OPTIONS)
    return out


def test_manifest_records_what_the_issue_asks(artifact):
    manifest = mf.read_manifest(artifact)
    unet = manifest["components"]["unet"]
    assert set(unet["files"]) == {"unet/model.onnx"}
    assert unet["spec"]["ranges"]["batch"] == [1, 2, 8]
    parity = unet["parity"]["onnxruntime"]
    assert parity["passed"] and parity["max_rel"] <= 1e-4 and parity["cosine"] > 0.9999
    assert manifest["opset"] >= 17 and manifest["precision"] == "fp32"
    for lib in ("torch", "onnx", "onnxruntime"):
        assert manifest["versions"][lib]
    assert len(manifest["source"]["sha256"]) == 64


def test_reexport_is_a_cache_hit_that_does_no_work(classemb_model_dir, artifact, caplog):
    onnx_file = artifact / "unet" / "model.onnx"
    before = onnx_file.stat().st_mtime_ns
    with caplog.at_level("INFO"):
        result = export_pixel_model(classemb_model_dir, artifact, OPTIONS)
    assert result.cache_hit
    assert "cache hit" in caplog.text
    assert onnx_file.stat().st_mtime_ns == before


def test_changed_weights_give_a_new_key(classemb_model_dir, artifact, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "model-copy"
    shutil.copytree(classemb_model_dir, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_out.bias"] = state["conv_out.bias"] + 1e-3
    save_file(state, weights)
    out = tmp_path / "other"
    assert not export_pixel_model(copy, out, OPTIONS).cache_hit
    assert mf.read_manifest(out)["key"] != mf.read_manifest(artifact)["key"]


def test_corrupted_onnx_is_refused(artifact):
    onnx_file = artifact / "unet" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        artifact_pixel_pipeline(artifact, "onnxruntime")


def test_interrupted_export_is_not_trusted_and_is_rebuilt(classemb_model_dir, artifact):
    (artifact / mf.MANIFEST).unlink()  # as if the export died before writing its manifest
    with pytest.raises(ArtifactError, match="did not finish"):
        artifact_pixel_pipeline(artifact, "onnxruntime")
    assert not export_pixel_model(classemb_model_dir, artifact, OPTIONS).cache_hit
    artifact_pixel_pipeline(artifact, "onnxruntime")


def test_truncated_manifest_is_refused(artifact):
    path = artifact / mf.MANIFEST
    path.write_text(path.read_text()[:50])
    with pytest.raises(ArtifactError, match="not valid JSON"):
        artifact_pixel_pipeline(artifact, "onnxruntime")


def test_lora_with_no_matching_keys_is_refused(classemb_model_dir, tmp_path):
    from safetensors.torch import save_file

    lora = tmp_path / "other_model.safetensors"
    save_file({"lora_unet_not_a_module_to_q.lora_down.weight": torch.ones(2, 8),
               "lora_unet_not_a_module_to_q.lora_up.weight": torch.ones(8, 2)}, lora)
    with pytest.raises(LoraError, match="not_a_module"):
        export_pixel_model(classemb_model_dir, tmp_path / "a", ExportOptions(batch=(1, 2, 8), loras=[(str(lora), 1.0)]))
    assert not (tmp_path / "a" / mf.MANIFEST).exists()


def test_export_parity_at_several_shapes(classemb_model_dir, artifact):
    from diffrt.export.verify import compare
    from diffrt.models import load_pixel_model

    model = load_pixel_model(classemb_model_dir)
    pipe = artifact_pixel_pipeline(artifact, "onnxruntime")
    spec = pipe.unet.spec
    for batch in (1, 3, 8):
        feed = spec.example_feed("opt", batch=batch, seed=batch)
        with torch.no_grad():
            ref = model.unet(feed["sample"], feed["timestep"], feed["class_labels"])
        parity = compare(ref, pipe.unet.run(feed)["noise_pred"])
        assert parity.max_rel <= 1e-4, (batch, parity)
    assert json.loads((artifact / mf.MANIFEST).read_text())["kind"] == "pixel"
