"""Hub ids (`org/name[@revision]`) resolve to snapshot folders in the Hugging Face cache.

No network here: each test builds the cache layout huggingface_hub itself writes
(`models--org--name/refs/main`, `snapshots/<commit>/...`) and runs huggingface_hub offline, so
the lookup under test is huggingface_hub's own."""

from __future__ import annotations

import shutil

import pytest
import torch

from diffrt.errors import DiffrtError
from diffrt.hub import is_hub_id, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache; `add(repo, folder)` puts a model in it as the Hub would."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def add(repo: str, folder, commit: str = COMMIT, ref: str = "main"):
        storage = cache / f"models--{repo.replace('/', '--')}"
        shutil.copytree(folder, storage / "snapshots" / commit)
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
        return storage / "snapshots" / commit

    return add


def test_hub_ids_and_local_paths_are_told_apart(tmp_path):
    assert is_hub_id("runwayml/stable-diffusion-v1-5") and is_hub_id("org/name@fp16-free")
    assert not is_hub_id(str(tmp_path))  # an existing path is a path, even with one slash
    assert not is_hub_id("a/b/c") and not is_hub_id("just-a-name")
    assert resolve_model(tmp_path) == tmp_path and resolve_model(None) is None


@pytest.mark.parametrize("text", ["runs/sd--ft", "org/bad..name", "org/name.", "org/" + "n" * 100])
def test_a_path_not_there_that_reads_as_an_invalid_hub_id_is_one_line(text, monkeypatch):
    """The bug: huggingface_hub's HFValidationError (a ValueError) escaped as a traceback (a mistyped local path)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DiffrtError, match=r"is neither a local folder nor a valid Hugging Face id .*; check the path$"):
        resolve_model(text)


def test_a_cached_repo_generates_as_its_folder(hub_cache, t2i_folder):
    from diffrt.generate import GenerateRequest, generate

    snapshot = hub_cache("tiny/sd", t2i_folder)
    assert resolve_model("tiny/sd") == snapshot
    request = GenerateRequest(backend="torch", device="cpu", prompt="a cat", num_inference_steps=2, seed=1)
    from_hub = generate(GenerateRequest(**{**request.__dict__, "model": "tiny/sd"})).images
    assert torch.equal(from_hub, generate(GenerateRequest(**{**request.__dict__, "model": str(t2i_folder)})).images)


def test_a_revision_picks_its_snapshot(hub_cache, t2i_folder, uncond_model_dir):
    hub_cache("tiny/model", t2i_folder)
    other = hub_cache("tiny/model", uncond_model_dir, commit="f" * 40, ref="v2")
    assert resolve_model("tiny/model@v2") == other


def test_a_revision_that_climbs_out_of_the_cache_is_refused(hub_cache, uncond_model_dir, tmp_path):
    """From a security review: huggingface_hub reads refs/<revision> in the cache and takes its content for the
    snapshot, so org/name@../../../../x used a file outside the cache to name any folder as the model."""
    hub_cache("org/model", uncond_model_dir)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "ref").write_text(str(uncond_model_dir))
    climb = "../../../outside/ref"  # from <cache>/models--org--model/refs/ to the planted file (a review's count)
    assert (tmp_path / "hf-cache" / "models--org--model" / "refs" / climb).resolve() == (outside / "ref").resolve()
    for revision in (climb, "..", "a/../b", "/abs", ".hidden"):
        with pytest.raises(DiffrtError, match=r"is not a revision \(a commit hash, branch or tag\)"):
            resolve_model(f"org/model@{revision}")
    assert resolve_model(f"org/model@{COMMIT}").name == COMMIT  # a hash, and refs/main, still resolve
    assert resolve_model("org/model@main").name == COMMIT


def test_a_mistyped_path_beside_its_folder_is_named_as_a_path(hub_cache, tmp_path, monkeypatch):
    """The bug (a review's): `--model runs/digit` beside runs/digits was taken for a Hub id and answered with the
    Hub's cache and network; its first part is a folder here, so it is a path, and the closest entries are named."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "digits").mkdir(parents=True)
    with pytest.raises(DiffrtError, match=r"^model folder not found: runs/digit \(.*; did you mean runs/digits\?\); as a Hub "
                                          r"id, not in the Hugging Face cache, and the Hub cannot be reached \(offline"):
        resolve_model("runs/digit")  # the Hub's answer still follows: it may be an id after all (offline here)
    with pytest.raises(DiffrtError, match="neither a local folder nor in the Hugging Face cache"):
        resolve_model("nobody/digit")  # no folder nobody/ here: an id the cache lacks


def test_a_gated_repo_beside_a_folder_of_its_orgs_name_still_says_how_to_read_it(tmp_path, monkeypatch):
    """From a review: a folder stabilityai/ (a download with --local-dir) made a gated stabilityai/sd-turbo's answer
    'model folder not found', without the HF_TOKEN it needs."""
    import httpx
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    response = httpx.Response(401, request=httpx.Request("GET", "https://huggingface.co/api/models/stabilityai/sd-turbo"))

    def gated(*args, **kwargs):
        raise hf_errors.GatedRepoError("Access to model stabilityai/sd-turbo is restricted", response=response)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    (tmp_path / "stabilityai" / "sd-turbo-old").mkdir(parents=True)
    with pytest.raises(DiffrtError, match=r"did you mean stabilityai/sd-turbo-old\?\); as a Hub id, not a Hub repository you "
                                          r"can read \(set HF_TOKEN for a gated or private one\)$"):
        resolve_model("stabilityai/sd-turbo")


def test_cli_resolves_hub_ids_and_says_what_is_missing(hub_cache, uncond_model_dir, tmp_path, capsys):
    from diffrt.cli import main

    hub_cache("tiny/ddim", uncond_model_dir)
    assert main(["generate", "--model", "tiny/ddim", "--steps", "2", "--num-images", "1", "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").is_file()
    assert main(["generate", "--model", "nobody/nothing", "--out", str(tmp_path / "y.png")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "nobody/nothing is neither a local folder nor in the Hugging Face cache" in line and "HF_HUB_OFFLINE" in line
    with pytest.raises(DiffrtError, match="tiny/ddim@no-such-tag is neither a local folder nor in the Hugging Face cache"):
        resolve_model("tiny/ddim@no-such-tag")


def test_only_what_diffrt_loads_is_fetched():
    """The file filter snapshot_download applies (huggingface_hub's own), over the files of a Stable
    Diffusion 1.5 repository: configs, tokenizer and each part's main safetensors; no pickles, no
    fp16/EMA variants, no 4 GB root checkpoint, no safety checker."""
    from huggingface_hub.utils import filter_repo_objects

    from diffrt.hub import ALLOW, IGNORE

    listing = ["model_index.json", "v1-5-pruned.safetensors", "v1-5-pruned.ckpt", "v1-5-pruned-emaonly.safetensors",
               "feature_extractor/preprocessor_config.json", "safety_checker/config.json", "safety_checker/model.safetensors",
               "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
               "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin", "tokenizer/merges.txt",
               "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
               "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
               "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.bin",
               "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
               "README.md", "v1-inference.yaml"]
    fetched = set(filter_repo_objects(listing, allow_patterns=ALLOW, ignore_patterns=IGNORE))
    assert fetched == {"model_index.json", "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json",
                       "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/merges.txt",
                       "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
                       "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                       "vae/diffusion_pytorch_model.safetensors"}
    sharded = ["unet/diffusion_pytorch_model-00001-of-00002.safetensors", "unet/diffusion_pytorch_model.safetensors.index.json",
               "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors"]
    assert set(filter_repo_objects(sharded, allow_patterns=ALLOW, ignore_patterns=IGNORE)) == set(sharded[:2])


def test_the_service_takes_a_hub_id_too(hub_cache, t2i_folder):
    """ServeConfig/RuntimeConfig (the library's way to serve, Ray replicas included) resolve Hub ids like the CLI."""
    from diffrt.serve.runtime import RuntimeConfig, make_worker

    snapshot = hub_cache("tiny/sd", t2i_folder)
    controlnet = hub_cache("tiny/sd-controlnet", t2i_folder / "controlnet")
    worker = make_worker(RuntimeConfig(model="tiny/sd", backend="torch", device="cpu", controlnet="tiny/sd-controlnet"))
    assert type(worker).__name__ == "TextToImageWorker"
    assert (worker.model, worker.controlnet) == (str(snapshot), [str(controlnet)])
