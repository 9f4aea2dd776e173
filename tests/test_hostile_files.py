"""Files made to harm the machine that opens them are refused in one line, before anything reads them.

* a LoRA file's metadata (its LoraConfig) is checked for type, and its rank_pattern / alpha_pattern
  keys are never run as regular expressions that can backtrack for hours (ReDoS);
* an ONNX graph's external data must be plain files in the graph's own folder, each hashed by the
  artifact's manifest: not ../.., not an absolute path, not a symbolic link;
* a Triton repository holds the model's files, never symbolic links: a Hugging Face snapshot's
  links to its blobs are placed as the blobs, a link to elsewhere on the host is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from diffrt.atomic import save_safetensors, sha256_file
from diffrt.errors import ArtifactError, DiffrtError, LoraError
from diffrt.export import manifest as mf
from diffrt.export.lora import METADATA_KEY, read_lora
from diffrt.export.onnx import check_onnx_files
from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline
from diffrt.serve.triton_repo import RepositoryConfig, write_repository
from diffrt.tiny import tiny_lora_files


@contextlib.contextmanager
def within(seconds: int):
    """Fail, rather than hang, when the body takes longer (Python's `re` checks for signals as it backtracks)."""
    def expire(*_):
        raise TimeoutError(f"took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- LoRA metadata ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_lora(t2i_folder, tmp_path_factory) -> Path:
    """diffusers' save_lora_weights file, its LoraConfig (rank 4, alpha 8) in the metadata."""
    return tiny_lora_files(t2i_folder, tmp_path_factory.mktemp("lora"), seed=1)["peft"]


def with_unet_config(peft_lora: Path, out: Path, **changes) -> Path:
    """peft_lora re-saved with its UNet LoraConfig changed (a value None: the metadata replaced by `raw`)."""
    with safe_open(str(peft_lora), framework="pt") as f:
        tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata())
    if "raw" in changes:
        metadata[METADATA_KEY] = changes.pop("raw")
    else:
        config = json.loads(metadata[METADATA_KEY])
        metadata[METADATA_KEY] = json.dumps(config | {f"unet.{key}": value for key, value in changes.items()})
    save_safetensors(out, tensors, metadata)
    return out


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="the time limit uses SIGALRM")
@pytest.mark.parametrize("pattern", [r"((\w|\.)*)*!", r"(a|aa)*!", r"(\w+)+!", "(a)\\1", "to_q" * 70])
def test_a_pattern_that_could_backtrack_for_hours_is_refused_at_once(peft_lora, tmp_path, pattern):
    """The bug: alpha_pattern keys went straight into re.match, so ((\\w|\\.)*)*! hung the loader."""
    path = with_unet_config(peft_lora, tmp_path / "redos.safetensors", alpha_pattern={pattern: 2})
    with within(10), pytest.raises(LoraError, match=r"redos\.safetensors: the lora_adapter_metadata unet\.alpha_pattern key"):
        read_lora(path)


def test_module_name_patterns_set_the_alpha_and_one_nested_quantifier_among_them_is_refused(peft_lora, tmp_path):
    """The patterns real files carry (module names, as diffusers writes them) are matched as peft does;
    a key among them that could backtrack is refused, not run."""
    module = next(layer.module for layer in read_lora(peft_lora).layers if layer.component == "unet")
    patterns = {module: 2, "to_(q|k)": 3}
    path = with_unet_config(peft_lora, tmp_path / "named.safetensors", alpha_pattern=patterns)
    layer = next(layer for layer in read_lora(path).layers if layer.component == "unet" and layer.module == module)
    assert layer.alpha == 2
    path = with_unet_config(peft_lora, tmp_path / "named.safetensors", alpha_pattern=patterns | {"(proj_in+)+": 4})
    with pytest.raises(LoraError, match=r"key '\(proj_in\+\)\+' combines quantifiers or alternations"):
        read_lora(path)


@pytest.mark.parametrize("changes, words", [
    ({"raw": "[1, 2]"}, r"metadata is a JSON list, not a LoraConfig object"),
    ({"lora_alpha": "eight"}, r"gives unet\.lora_alpha = \"eight\", expected a number"),
    ({"lora_alpha": [1]}, r"gives unet\.lora_alpha = \[1\], expected a number"),
    ({"r": True}, r"gives unet\.r = true, expected a positive whole number"),
    ({"rank_pattern": "proj_in"}, r"gives unet\.rank_pattern = \"proj_in\", expected an object"),
    ({"alpha_pattern": {"proj_in": "2"}}, r"unet\.alpha_pattern\['proj_in'\] = \"2\", expected numbers"),
    ({"alpha_pattern": {"(": 2}}, r"key '\(' is not a regular expression"),
    ({"r": 10**400}, r"gives unet\.r = 1000.*, expected a positive whole number"),  # OverflowError from math.isfinite
    ({"raw": '{"unet.r": ' + "9" * 5000 + "}"}, r"metadata is not JSON diffrt can read"),  # a ValueError past 4300 digits
])
def test_lora_metadata_of_the_wrong_type_is_one_line(peft_lora, tmp_path, changes, words):
    """The bug: a non-object LoraConfig was an AttributeError, a non-number lora_alpha a TypeError or ValueError."""
    path = with_unet_config(peft_lora, tmp_path / "bad.safetensors", **changes)
    with pytest.raises(LoraError, match=rf"bad\.safetensors: .*{words}"):
        read_lora(path)


# --- ONNX external data ----------------------------------------------------------------------------


def graph_with_external_data(folder: Path, location: str) -> Path:
    """folder/model.onnx: y = x + W, W's 4 floats stored at `location`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    weight = numpy_helper.from_array(np.zeros(4, dtype=np.float32), "W")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("Add", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    return folder / "model.onnx"


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "secret" / "data.bin"
    path.parent.mkdir()
    path.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    return path


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_graphs_folder_is_refused(tmp_path, secret, kind):
    """The bug: a location was only checked to exist, so ../../secret, /abs/path or a link out of the
    folder passed diffrt's check, for whatever ONNX Runtime version or TensorRT parser came next."""
    beside = graph_with_external_data(tmp_path / "artifact" / "vae_decoder", "model.onnx.data")
    shutil.copy(secret, beside.parent / "model.onnx.data")
    check_onnx_files(beside)  # the control: the layout export writes
    folder = tmp_path / "artifact" / "unet"
    if kind == "parent":
        graph, words = graph_with_external_data(folder, "../../secret/data.bin"), "outside its folder"
    elif kind == "absolute":
        graph, words = graph_with_external_data(folder, str(secret)), "at the absolute path"
    else:
        graph, words = graph_with_external_data(folder, "model.onnx.data"), "which is a symbolic link"
        (folder / "model.onnx.data").symlink_to(secret)
    with pytest.raises(ArtifactError, match=rf"model\.onnx names external data .*{words}"):
        check_onnx_files(graph)


@pytest.mark.parametrize("location", ["extra.bin", "../extra.bin"])
def test_a_graph_naming_data_the_manifest_does_not_hash_is_refused(t2i_artifact, tmp_path, location):
    """The bug: verification hashed the files the manifest listed and model.onnx.data; a graph (with the
    manifest's hash of it updated) naming other data had ONNX Runtime read that data, unchecked."""
    import onnx

    artifact = shutil.copytree(t2i_artifact, tmp_path / "artifact")
    graph = artifact / "vae_decoder" / "model.onnx"
    onnx.save_model(onnx.load(str(graph)), str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="extra.bin", size_threshold=0)
    if location != "extra.bin":  # onnx writes no '..' location: the graph is edited after, as by hand
        model = onnx.load(str(graph), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                entry.value = location if entry.key == "location" else entry.value
        onnx.save_model(model, str(graph))
        (graph.parent / "extra.bin").rename(graph.parent / location)
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["components"]["vae_decoder"]["files"]["vae_decoder/model.onnx"] = sha256_file(graph)
    mf.write_manifest(artifact, manifest)
    words = "lists no sha256" if location == "extra.bin" else "outside its folder"
    with pytest.raises(ArtifactError, match=rf"vae_decoder/model\.onnx names external data .*{words}"):
        open_text_to_image_pipeline(artifact, "onnxruntime")


# --- Triton repository -----------------------------------------------------------------------------


def as_hub_snapshot(folder: Path, cache: Path) -> Path:
    """`folder` laid out as huggingface_hub's cache holds it: every file in blobs/, linked from
    snapshots/<revision>/ by a relative link."""
    repo = cache / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    shutil.copytree(folder, snapshot)
    (repo / "blobs").mkdir()
    for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        blob = repo / "blobs" / sha256_file(path)
        if not blob.exists():
            path.rename(blob)
        else:
            path.unlink()
        path.symlink_to(os.path.relpath(blob, path.parent))
    return snapshot


def test_a_hub_snapshot_is_placed_as_files(t2i_folder, tmp_path):
    """The bug: the snapshot's links were placed as links, whose ../../blobs/... dangle in the repository."""
    snapshot = as_hub_snapshot(t2i_folder, tmp_path / "hub")
    (snapshot / "README.md").symlink_to("model_index.json")  # a link inside the folder: its file is placed too
    path = write_repository(tmp_path / "repo", RepositoryConfig(model=str(snapshot), name="sd"))
    placed = path / "1" / "model"
    for source in t2i_folder.rglob("*"):
        if source.is_file():
            target = placed / source.relative_to(t2i_folder)
            assert not target.is_symlink() and target.read_bytes() == source.read_bytes(), target
    assert not (placed / "README.md").is_symlink()
    assert (placed / "README.md").read_bytes() == (t2i_folder / "model_index.json").read_bytes()


def test_a_link_to_a_file_elsewhere_on_the_host_is_refused(t2i_folder, tmp_path, secret):
    """The bug: a link to /some/host/file was carried into the repository as that link."""
    model = shutil.copytree(t2i_folder, tmp_path / "model")
    (model / "notes.txt").symlink_to(secret)
    with pytest.raises(DiffrtError, match=r"notes\.txt is a link to .*data\.bin, outside the model folder"):
        write_repository(tmp_path / "repo", RepositoryConfig(model=str(model), name="sd"))
    assert not (tmp_path / "repo" / "sd").exists()
