"""Refit logic on the CPU: which engines take LoRA, the cache key of TensorRT exports with LoRA, and
how a Refitter is driven (RELIABILITY #8, #10, #11).

No TensorRT here. What TensorRT does is stood in for, and only that: `stand_in_engines` writes a
plan file holding a digest of the weights it was built or refit with, and replaces the guard that
compares the engine's TensorRT/GPU with this machine's; `FakeRefitter` stands for trt.Refitter.
Everything around them (keys, manifests, weight maps, refit weights, which components are refit)
is the real code. Real engines are built and refit by the `gpu` tests in test_tensorrt.py.
"""

from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path

import pytest
import torch

from conftest import T2I_RANGES
from diffrt.atomic import sha256_file
from diffrt.errors import ArtifactError, BackendUnavailableError
from diffrt.export import manifest as mf
from diffrt.export import refit
from diffrt.export.artifact import export_pixel_model
from diffrt.export.cache import cached_export, lora_hashes
from diffrt.export.options import ExportOptions
from diffrt.export.text_to_image import export_text_to_image
from diffrt.runtime.backends import backend_available
from test_tensorrt import make_lora

PIXEL = dict(batch=(1, 2, 4), verify=False)
T2I = dict(T2I_RANGES, verify=False)


def weights_digest(weights: dict[str, torch.Tensor]) -> bytes:
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest().encode()


class EngineRecorder:
    """Stands in for building and refitting engines; records every refit it is asked for."""

    def __init__(self):
        self.calls: list[tuple[str, list[str]]] = []  # (component, initializer names patched)
        self.refittable: dict[str, bool] = {}  # component -> built with BuilderFlag.REFIT
        self.fail = False
        self.fail_on: str | None = None  # a component whose refit fails (the others succeed)

    def build_engine(self, onnx_path, spec, engine_path, precision="fp32", **options):
        self.refittable[spec.name] = options.get("refit", True)
        engine_path = Path(engine_path)
        engine_path.write_bytes(weights_digest(refit.onnx_initializers(onnx_path)))
        return {"tensorrt": "stand-in", "gpu": None, "precision": precision, "refittable": True, "loras": [],
                "sha256": sha256_file(engine_path)}

    def refit_engine(self, engine_path, weights, device="cuda", out=None):
        engine_path = Path(engine_path)
        out = engine_path if out is None else Path(out)
        self.calls.append((engine_path.parent.name, sorted(weights.patched)))
        if self.fail or self.fail_on == engine_path.parent.name:
            raise ArtifactError(f"{engine_path}: refit failed (stand-in)")
        out.write_bytes(weights_digest(weights.weights))
        n = len(weights.weights)
        return {"refittable": n, "set": n, "patched": len(weights.patched), "not_in_onnx": [],
                "sha256": sha256_file(out)}

    def components(self) -> list[str]:
        return sorted(name for name, _ in self.calls)


@pytest.fixture
def engines(monkeypatch) -> EngineRecorder:
    from diffrt.export import options, tensorrt

    recorder = EngineRecorder()
    monkeypatch.setattr(options, "require_backend", lambda name: None)
    monkeypatch.setattr(refit, "require_backend", lambda name: None)
    monkeypatch.setattr(tensorrt, "build_engine", recorder.build_engine)
    monkeypatch.setattr(refit, "refit_engine", recorder.refit_engine)
    monkeypatch.setattr(mf, "check_engine_compatible", lambda engine, device=None: None)
    return recorder


# --- B1: only engines that hold a UNet or text encoder are refit --------------------------------------


@pytest.fixture(scope="module")
def t2i_loras(t2i_folder, tmp_path_factory):
    from diffrt.tiny import tiny_lora_files

    return tiny_lora_files(t2i_folder, tmp_path_factory.mktemp("t2i_lora"), seed=1)


def test_t2i_tensorrt_export_with_lora_refits_base_engines(t2i_folder, t2i_loras, engines, tmp_path):
    lora = (str(t2i_loras["peft"]), 0.8)
    out = tmp_path / "trt"
    result = export_text_to_image(t2i_folder, out, ExportOptions(backend="tensorrt", loras=[lora], **T2I), [])
    manifest = result.manifest
    # The VAE decoder's engine takes no LoRA: only the text encoder's and UNet's are refit, each with patches.
    assert engines.components() == ["text_encoder", "unet"]
    assert all(patched for _, patched in engines.calls)
    assert engines.refittable == {"text_encoder": True, "unet": True, "vae_decoder": False}  # built refittable where LoRA goes
    # The ONNX keeps base weights (the engines take LoRA by refit); the manifest says so.
    assert manifest["onnx_loras"] == [] and [(e["sha256"], e["scale"]) for e in manifest["loras"]] == [
        (x["sha256"], x["scale"]) for x in lora_hashes(ExportOptions(loras=[lora]))]
    assert manifest["components"]["unet"]["engine"]["loras"] == manifest["loras"]
    assert manifest["components"]["vae_decoder"]["engine"]["loras"] == []
    from diffrt.text_to_image_models import load_unet

    wmap = refit.read_weight_map(out / "unet" / "model.onnx")
    inits = refit.onnx_initializers(out / "unet" / "model.onnx")
    state = load_unet(t2i_folder).state_dict()
    for name, e in wmap["weights"].items():
        value = state[e["param"]].T if e["transpose"] else state[e["param"]]
        assert torch.equal(inits[name], value), name

    # `diffrt refit` with no LoRA restores the base engines, again only those two.
    vae_plan = (out / "vae_decoder" / "engine.plan").read_bytes()
    engines.calls.clear()
    refit.refit_artifact(out, [])
    assert engines.components() == ["text_encoder", "unet"] and all(not p for _, p in engines.calls)
    for name in ("text_encoder", "unet"):
        assert (out / name / "engine.plan").read_bytes() == weights_digest(refit.onnx_initializers(out / name / "model.onnx"))
    assert (out / "vae_decoder" / "engine.plan").read_bytes() == vae_plan
    manifest = mf.read_manifest(out)
    assert manifest["loras"] == [] and manifest["key"] == result.manifest["key"]
    mf.verify_files(out, manifest)


def test_a_refit_failing_on_its_second_engine_changes_no_engine(t2i_folder, t2i_loras, engines, tmp_path):
    """From a review: `diffrt refit` rewrote each engine in turn and the manifest last, so a failure on the UNet (a
    weight TensorRT refused, Ctrl-C, out of memory) left the text encoder's plan rewritten, its hash stale, and the
    artifact refused by everything, the next refit included. Every engine is refit aside and put in place together;
    NaN and inf scales, which were refit and recorded, are refused first."""
    import math

    from diffrt.errors import LoraError

    lora = str(t2i_loras["peft"])
    out = tmp_path / "trt"
    export_text_to_image(t2i_folder, out, ExportOptions(backend="tensorrt", **T2I), [])
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    engines.fail_on = "unet"  # refit after the text encoder
    with pytest.raises(ArtifactError, match="unet/engine.plan: refit failed"):
        refit.refit_artifact(out, [(lora, 0.8)])
    assert engines.components() == ["text_encoder", "unet"]
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != refit.WEIGHT_MAP}
    assert after == {k: v for k, v in before.items() if k.name != refit.WEIGHT_MAP}  # no temporary left, no engine changed
    mf.verify_files(out, mf.read_manifest(out))
    engines.fail_on = None
    refit.refit_artifact(out, [(lora, 0.8)])  # and the next refit runs
    assert mf.read_manifest(out)["loras"][0]["scale"] == 0.8
    for bad in (math.nan, math.inf):
        with pytest.raises(LoraError, match="must be a finite number"):
            refit.refit_artifact(out, [(lora, bad)])
    assert mf.read_manifest(out)["loras"][0]["scale"] == 0.8


def test_a_strength_change_reads_only_the_weights_of_the_export_it_opened(t2i_folder, t2i_loras, engines, tmp_path):
    """From a review: running engines read their base weights from the artifact's ONNX on the first change of the LoRA's
    strength, unlocked and unchecked; an export that had rebuilt the folder in place since (as diffrt allows beside a
    running pipeline) handed the old engines every weight of the new export. They are checked against the manifest
    the engines were opened with, under the artifact's lock."""
    from types import SimpleNamespace

    from diffrt.errors import DiffrtError
    from diffrt.runtime.loading import artifact_lora

    out = tmp_path / "trt"
    export_text_to_image(t2i_folder, out, ExportOptions(backend="tensorrt", loras=[(str(t2i_loras["peft"]), 0.8)], **T2I), [])
    refits = []
    running = {name: SimpleNamespace(refit=lambda plan, name=name: refits.append(name)) for name in ("text_encoder", "unet", "vae_decoder")}

    lora = artifact_lora(out, mf.read_manifest(out), "tensorrt", running)
    lora.set_scale(0.5)  # the folder as opened: refit from its base weights
    assert sorted(refits) == ["text_encoder", "unet"] and lora.scale == 0.5

    # `diffrt refit` on disk rewrites the engine plans over the same base weights: a pipeline opened before still
    # changes its strength from them.
    lora = artifact_lora(out, mf.read_manifest(out), "tensorrt", running)
    refit.refit_artifact(out, [(str(t2i_loras["peft"]), 0.5)])
    refits.clear()
    lora.set_scale(2.0)
    assert sorted(refits) == ["text_encoder", "unet"]

    # Rebuilt in place since it was opened: other base weights, with a weight map of their own (what an export writes).
    import json

    import onnx
    from onnx import numpy_helper

    lora = artifact_lora(out, mf.read_manifest(out), "tensorrt", running)
    path = out / "unet" / "model.onnx"
    graph = onnx.load(str(path))
    first = graph.graph.initializer[0]
    first.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(first) * 1.5, first.name))
    onnx.save(graph, str(path))
    wmap_path = out / "unet" / refit.WEIGHT_MAP
    wmap = json.loads(wmap_path.read_text())
    wmap["onnx_sha256"] = sha256_file(path)
    wmap_path.write_text(json.dumps(wmap))
    assert refit.read_weight_map(path) is not None  # the new export's files agree with each other
    refits.clear()
    with pytest.raises(DiffrtError, match=r"changed since it was opened .*unet/model.onnx.*; reopen it to change its LoRA's strength"):
        lora.set_scale(0.5)
    assert lora.scalable is False and refits == []


def test_refit_skips_the_standalone_controlnet_and_vae(t2i_folder, engines, tmp_path):
    out = tmp_path / "trt"
    export_text_to_image(t2i_folder, out, ExportOptions(backend="tensorrt", **T2I),
                         [str(t2i_folder / "controlnet")])
    manifest = mf.read_manifest(out)
    assert {n for n, c in manifest["components"].items() if "engine" in c} == {"text_encoder", "unet_controlnet", "controlnet", "vae_decoder"}
    assert not engines.calls  # no LoRA asked: the engines are left as built
    refit.refit_artifact(out, [])
    assert engines.components() == ["text_encoder", "unet_controlnet"]


@pytest.mark.skipif(backend_available("tensorrt"), reason="TensorRT is available here")
def test_refit_of_an_engine_artifact_without_tensorrt_says_so_after_the_folder_checks(classemb_model_dir, engines, tmp_path,
                                                                                    monkeypatch):
    """The folder is checked first (no artifact, an ONNX one: their own lines), then whether TensorRT runs here."""
    from diffrt.runtime.backends import require_backend

    out = export_pixel_model(classemb_model_dir, tmp_path / "trt", ExportOptions(backend="tensorrt", **PIXEL)).folder
    onnx = export_pixel_model(classemb_model_dir, tmp_path / "onnx", ExportOptions(**PIXEL)).folder
    monkeypatch.setattr(refit, "require_backend", require_backend)
    with pytest.raises(ArtifactError, match="has no TensorRT engine to refit"):
        refit.refit_artifact(onnx, [])
    with pytest.raises(BackendUnavailableError, match="backend 'tensorrt' is not available"):
        refit.refit_artifact(out, [])
    assert not engines.calls


def test_refit_waits_for_an_export_rebuilding_the_artifact(classemb_model_dir, engines, tmp_path):
    """From a review: refit's look at the folder before its lock read a manifest a rebuild had just removed, and
    refused "not an artifact folder" where it had waited for the export."""
    import threading
    import time

    from diffrt.export.cache import REBUILD

    out = export_pixel_model(classemb_model_dir, tmp_path / "trt", ExportOptions(backend="tensorrt", **PIXEL)).folder
    manifest = (out / mf.MANIFEST).read_bytes()
    rebuilding = threading.Event()

    def rebuild():
        with mf.artifact_lock(out):
            (out / REBUILD).write_text("{}")
            (out / mf.MANIFEST).unlink()
            rebuilding.set()
            time.sleep(1)
            (out / mf.MANIFEST).write_bytes(manifest)
            (out / REBUILD).unlink()

    export = threading.Thread(target=rebuild)
    export.start()
    try:
        assert rebuilding.wait(30)
        refit.refit_artifact(out, [])
    finally:
        export.join(30)


def test_refit_refuses_a_lora_for_a_component_without_a_lora_engine(t2i_folder, t2i_loras, engines, tmp_path):
    out = tmp_path / "trt"
    export_text_to_image(t2i_folder, out, ExportOptions(backend="tensorrt", **T2I), [])
    manifest = mf.read_manifest(out)
    del manifest["components"]["text_encoder"]["engine"]  # as if the text encoder had no engine
    with pytest.raises(ArtifactError, match="text_encoder weights but no engine"):
        refit.refit_components(out, manifest, [(t2i_loras["peft"], 1.0)])
    assert not engines.calls


def test_an_initializer_the_unet_shares_with_an_equal_controlnet_weight_is_not_refit(t2i_folder, t2i_loras, engines, tmp_path):
    """From a review: the TorchScript exporter merges identical constants, so in the fused graph a ControlNet made from
    the UNet shares the UNet's initializers for every weight it kept, and its own copies have none. The by-name step
    gave such an initializer to the UNet, and a UNet LoRA refit into it patched the ControlNet too (off by a third of
    the LoRA's effect against a fresh export). It stands for both now: a LoRA on it is refused, naming what to do."""
    out = tmp_path / "trt"
    export_text_to_image(t2i_folder, out, ExportOptions(backend="tensorrt", **T2I), [str(t2i_folder / "controlnet")])
    wmap = refit.read_weight_map(out / "unet_controlnet" / "model.onnx")
    shared = {name: owners for name, owners in wmap["ambiguous"].items()
              if any(o.startswith("unet.") for o in owners) and any(o.startswith("controlnet.") for o in owners)}
    assert shared  # the tiny ControlNet keeps the UNet's weights outside its embedding and output convs
    mapped = {(e["component"], e["param"]) for e in wmap["weights"].values()}
    for owners in shared.values():  # none of them patched through it
        assert not {tuple(o.split(".", 1)) for o in owners} & mapped
    # A LoRA on the UNet's resnet convs alone: their initializers keep their names, which the by-name step matched.
    from safetensors.torch import load_file, save_file

    kohya = load_file(t2i_loras["kohya"])
    conv_only = tmp_path / "conv_only.safetensors"
    save_file({k: v for k, v in kohya.items() if k.startswith("lora_unet_") and "_resnets_" in k}, conv_only)
    engines.calls.clear()
    with pytest.raises(ArtifactError, match="holds under no initializer diffrt could identify.*export with --lora instead"):
        refit.refit_artifact(out, [(str(conv_only), 1.0)])
    assert engines.calls == []


def _trained_controlnet(src: Path, dst: Path, seed: int) -> Path:
    """A copy of the ControlNet at `src` with every weight moved off the UNet's. The tiny ControlNets
    are made from the UNet, so equal copies of its weights leave the fused graph's constant-folded
    MatMul weights ambiguous by value, and a LoRA on them is refused; trained ControlNets differ."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_pretrained(src)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 1e-3)
    controlnet.save_pretrained(dst, safe_serialization=True)
    return dst


def test_lora_refit_of_the_fused_graph_with_two_controlnets_patches_the_unet_only(t2i_folder, t2i_controlnet_b, t2i_loras,
                                                                                   engines, tmp_path):
    controlnets = [_trained_controlnet(t2i_folder / "controlnet", tmp_path / "c0", 1),
                   _trained_controlnet(t2i_controlnet_b, tmp_path / "c1", 2)]
    out = tmp_path / "trt"
    options = ExportOptions(backend="tensorrt", loras=[(str(t2i_loras["peft"]), 0.8)], **T2I)
    manifest = export_text_to_image(t2i_folder, out, options, controlnets).manifest
    assert engines.components() == ["text_encoder", "unet_controlnet"] and all(patched for _, patched in engines.calls)
    wmap = refit.read_weight_map(out / "unet_controlnet" / "model.onnx")
    assert {wmap["weights"][name]["component"] for name in dict(engines.calls)["unet_controlnet"]} == {"unet"}
    assert {e["param"].split(".")[1] for e in wmap["weights"].values() if e["component"] == "controlnet"} == {"0", "1"}
    assert manifest["components"]["controlnet"]["engine"]["loras"] == [] and manifest["onnx_loras"] == []
    assert export_text_to_image(t2i_folder, out, options, controlnets).cache_hit and len(engines.calls) == 2


# --- B2: the cache key of TensorRT exports with LoRA -----------------------------------------------------


@pytest.fixture(scope="module")
def pixel_loras(classemb_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pixel_loras")
    return {"A": make_lora(classemb_model_dir, folder / "a.safetensors", 1),
            "B": make_lora(classemb_model_dir, folder / "b.safetensors", 2)}


def test_tensorrt_export_with_lora_is_cached_by_base_key_and_lora(classemb_model_dir, pixel_loras, engines, tmp_path):
    out = tmp_path / "trt"
    with_a = ExportOptions(backend="tensorrt", loras=[(str(pixel_loras["A"]), 1.0)], **PIXEL)
    first = export_pixel_model(classemb_model_dir, out, with_a)
    assert engines.components() == ["unet"] and engines.calls[0][1]
    # The manifest's key is the base export's; the LoRA is recorded beside it.
    base_key = first.manifest["key"]
    assert [e["sha256"] for e in first.manifest["loras"]] == [lora_hashes(with_a)[0]["sha256"]]

    # 1. The same export again is a cache hit and refits nothing.
    again = export_pixel_model(classemb_model_dir, out, with_a)
    assert again.cache_hit and len(engines.calls) == 1

    # 2. `refit` to base; then `export --lora A` is a miss that refits A (not the base engine passed off as A) ...
    refit.refit_artifact(out, [])
    assert mf.read_manifest(out)["key"] == base_key
    assert export_pixel_model(classemb_model_dir, out, ExportOptions(backend="tensorrt", **PIXEL)).cache_hit
    engines.calls.clear()
    result = export_pixel_model(classemb_model_dir, out, with_a)
    assert not result.cache_hit and engines.calls and engines.calls[-1][1]
    assert result.manifest["key"] == base_key and result.manifest["loras"][0]["sha256"] == first.manifest["loras"][0]["sha256"]
    # ... and another scale of the same file is another LoRA state.
    assert cached_export(out, base_key, 0.0, lora_hashes(ExportOptions(loras=[(str(pixel_loras["A"]), 0.5)]))) is None
    assert cached_export(out, base_key, 0.0, lora_hashes(with_a)) is not None


def test_failed_refit_at_export_leaves_no_cache_hit(classemb_model_dir, pixel_loras, engines, tmp_path):
    out = tmp_path / "trt"
    with_b = ExportOptions(backend="tensorrt", loras=[(str(pixel_loras["B"]), 1.0)], **PIXEL)
    engines.fail = True
    with pytest.raises(ArtifactError, match="refit failed"):
        export_pixel_model(classemb_model_dir, out, with_b)
    assert not (out / mf.MANIFEST).exists()  # the engines' refit comes before the manifest
    engines.fail = False
    result = export_pixel_model(classemb_model_dir, out, with_b)
    assert not result.cache_hit and len(engines.calls) == 2 and engines.calls[-1][1]
    assert export_pixel_model(classemb_model_dir, out, with_b).cache_hit


# --- item 9: a Refitter is given every refittable weight, every time (A, B, A equals A) ---------------


class FakeTrt:
    """The few names of the tensorrt module that `set_engine_weights` uses."""

    class DataType:
        FLOAT, HALF, INT32, INT8, BOOL = "FLOAT", "HALF", "INT32", "INT8", "BOOL"

    class Weights:
        def __init__(self, dtype, ptr: int, count: int):
            assert dtype == "FLOAT"
            self.values = torch.frombuffer((ctypes.c_float * count).from_address(ptr), dtype=torch.float32).clone()


class FakeRefitter:
    """Holds an engine's weights (name -> tensor); set values take effect at refit_cuda_engine."""

    def __init__(self, engine: dict[str, torch.Tensor]):
        self.engine, self.pending = engine, {}

    def get_all_weights(self):
        return list(self.engine)

    def get_weights_prototype(self, name):
        return type("Proto", (), {"size": self.engine[name].numel(), "dtype": "FLOAT"})()

    def set_named_weights(self, name, weights) -> bool:
        self.pending[name] = weights.values.reshape(self.engine[name].shape)
        return True

    def get_missing_weights(self):
        return []

    def refit_cuda_engine(self) -> bool:
        self.engine.update(self.pending)
        return True


def test_every_refittable_weight_is_set_on_every_refit(classemb_model_dir, pixel_loras, tmp_path):
    from diffrt.export.lora import read_lora
    from diffrt.models import load_pixel_model

    onnx_path = export_pixel_model(classemb_model_dir, tmp_path / "onnx", ExportOptions(**PIXEL)).folder / "unet" / "model.onnx"
    wmap = refit.build_weight_map(onnx_path, {"unet": load_pixel_model(classemb_model_dir).unet.unet})
    inits = refit.onnx_initializers(onnx_path)
    engine = {n: t.clone() for n, t in inits.items() if t.dtype == torch.float32 and t.ndim in (2, 4)}
    base = {n: t.clone() for n, t in engine.items()}
    states = []
    for name in "ABA":
        weights = refit.refit_weights(onnx_path, wmap, [(read_lora(pixel_loras[name]), 1.0)], inits)
        refitter = FakeRefitter(engine)
        counts = refit.set_engine_weights(FakeTrt, refitter, weights, onnx_path, [])
        assert set(refitter.pending) == set(engine) and counts["set"] == len(engine)  # all, not only the patched
        assert counts["patched"] == len(weights.patched) > 0
        states.append({n: t.clone() for n, t in engine.items()})
    a, b, a_again = states
    assert all(torch.equal(a[n], a_again[n]) for n in a)
    assert any(not torch.equal(a[n], b[n]) for n in a) and any(not torch.equal(a[n], base[n]) for n in a)

    # From the TensorRT review: a failed refit quoted the last two errors of the process-wide log, however old.
    failing = FakeRefitter(engine)
    failing.refit_cuda_engine = lambda: False
    earlier = ["an earlier, unrelated build failed"]
    with pytest.raises(ArtifactError, match=r"could not refit the engine \[no error logged\]$"):
        refit.set_engine_weights(FakeTrt, failing, weights, onnx_path, earlier)
    from diffrt.export.tensorrt import ErrorLog

    log = ErrorLog(earlier)
    failing.refit_cuda_engine = lambda: log.add("refit: weights of another shape") or False
    with pytest.raises(ArtifactError, match=r"could not refit the engine \[refit: weights of another shape\]$"):
        refit.set_engine_weights(FakeTrt, failing, weights, onnx_path, log)

    folded = refit.RefitWeights(weights.weights, ["not_refittable"])
    with pytest.raises(ArtifactError, match="folded"):
        refit.set_engine_weights(FakeTrt, FakeRefitter(engine), folded, onnx_path, [])


def test_onnx_files_of_an_artifact_refit_with_lora_are_not_run(classemb_model_dir, pixel_loras, engines, tmp_path):
    # After a refit the engines hold the LoRA and the ONNX files the base weights: ONNX Runtime must
    # not run them under the manifest's LoRA.
    from diffrt.runtime.loading import artifact_pixel_pipeline

    out = tmp_path / "trt"
    export_pixel_model(classemb_model_dir, out, ExportOptions(backend="tensorrt", loras=[(str(pixel_loras["A"]), 1.0)], **PIXEL))
    with pytest.raises(ArtifactError, match=r"refit with LoRA \(a.safetensors:1.0\) but its ONNX files hold other weights"):
        artifact_pixel_pipeline(out, "onnxruntime", "cpu")
    refit.refit_artifact(out, [])  # back to base: engines and ONNX agree again
    assert artifact_pixel_pipeline(out, "onnxruntime", "cpu").backend == "onnxruntime"


# --- DoRA and LoRA bias terms: refit fuses from the base, or refuses by name ----------------------


def make_dora(model_dir: Path, path: Path, seed: int) -> Path:
    """make_lora's file plus a DoRA magnitude per module: each output row's base norm, perturbed."""
    from safetensors.torch import load_file

    from diffrt.atomic import save_safetensors
    from diffrt.models import load_pixel_model

    tensors = load_file(make_lora(model_dir, path, seed))
    modules = dict(load_pixel_model(model_dir).unet.unet.named_modules())
    g = torch.Generator().manual_seed(seed)
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        weight = modules[key[len("unet."):-len(".lora_A.weight")]].weight.detach()
        norm = torch.linalg.vector_norm(weight.reshape(weight.shape[0], -1), dim=1)
        tensors[key.replace("lora_A.weight", "lora_magnitude_vector")] = norm * (1 + 0.3 * torch.randn(norm.shape, generator=g))
    save_safetensors(path, tensors)
    return path


@pytest.fixture(scope="module")
def pixel_onnx(classemb_model_dir, tmp_path_factory) -> Path:
    return export_pixel_model(classemb_model_dir, tmp_path_factory.mktemp("pixel_onnx"), ExportOptions(**PIXEL)).folder


def run_pixel(folder: Path, onnx_path: Path, feed: dict) -> torch.Tensor:
    from diffrt.components import spec_from_dict
    from diffrt.runtime.backends.onnxruntime import OnnxRuntimeBackend

    spec = spec_from_dict(mf.read_manifest(folder)["components"]["unet"]["spec"])
    return next(iter(OnnxRuntimeBackend(onnx_path, spec, threads=1).run(feed).values()))


def test_refit_fuses_dora_from_the_base_weights(classemb_model_dir, pixel_onnx, tmp_path):
    """DoRA is not linear in the scale, so refit cannot be base + scale * delta: at two scales the
    refit ONNX (attention MatMuls, transposed, and convs) runs like PyTorch with the DoRA fused."""
    import test_tensorrt as trt_tests

    from diffrt.components import spec_from_dict
    from diffrt.export.lora import read_lora
    from diffrt.export.lora_fuse import fuse_loras
    from diffrt.models import load_pixel_model

    onnx_path = pixel_onnx / "unet" / "model.onnx"
    wmap = refit.build_weight_map(onnx_path, {"unet": load_pixel_model(classemb_model_dir).unet.unet})
    lora = read_lora(make_dora(classemb_model_dir, tmp_path / "dora.safetensors", 7))
    feed = spec_from_dict(mf.read_manifest(pixel_onnx)["components"]["unet"]["spec"]).example_feed("opt", seed=3)
    outputs = {}
    for scale in (0.5, 1.5):
        weights = refit.refit_weights(onnx_path, wmap, [(lora, scale)])
        assert len(weights.patched) >= len(lora.layers)
        got = run_pixel(pixel_onnx, trt_tests._onnx_with(pixel_onnx, weights, tmp_path / f"at{scale}"), feed)
        unet = load_pixel_model(classemb_model_dir).unet
        fuse_loras({"unet": unet.unet}, [(lora, scale)])
        with torch.no_grad():
            want = unet(*feed.values())
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), scale
        outputs[scale] = got
    assert (outputs[0.5] - outputs[1.5]).abs().max() > 1e-2


def test_refit_refuses_lora_bias_terms_by_name(classemb_model_dir, engines, tmp_path):
    from safetensors.torch import load_file

    from diffrt.atomic import save_safetensors
    from diffrt.export.lora import read_lora

    path = make_lora(classemb_model_dir, tmp_path / "bias.safetensors", 3)
    tensors = load_file(path)
    tensors["unet.up_blocks.1.attentions.1.to_out.0.lora_B.bias"] = torch.ones(tensors[
        "unet.up_blocks.1.attentions.1.to_out.0.lora_B.weight"].shape[0])
    save_safetensors(path, tensors)
    out = tmp_path / "trt"
    export_pixel_model(classemb_model_dir, out, ExportOptions(backend="tensorrt", **PIXEL))
    before = (out / "unet" / "engine.plan").read_bytes()
    message = r"bias.safetensors has LoRA bias terms \(lora_B.bias, on 1 modules, e.g. .*to_out.0.lora_A.weight\).*sets weights, not biases"
    with pytest.raises(ArtifactError, match=message):
        refit.refit_artifact(out, [(path, 1.0)])
    assert not engines.calls and (out / "unet" / "engine.plan").read_bytes() == before
    wmap = refit.read_weight_map(out / "unet" / "model.onnx")
    with pytest.raises(ArtifactError, match="lora_B.bias"):
        refit.refit_weights(out / "unet" / "model.onnx", wmap, [(read_lora(path), 1.0)])
