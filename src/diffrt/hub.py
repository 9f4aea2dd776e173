"""Models named by a Hugging Face Hub id (`runwayml/stable-diffusion-v1-5`, `org/name@revision`).

A `--model`, `--controlnet` or `--clip-model` that is not a local path but reads as a hub id is
resolved to a folder in the Hugging Face cache, as diffusers' `from_pretrained` resolves it, and
everything downstream sees a plain diffusers folder (so an export's manifest names the snapshot
it was made from). Only what diffrt loads is fetched: configs, tokenizer files and the main
safetensors weights of each part. Pickled weights (`.bin`, `.ckpt`) are never downloaded, nor
half-precision or EMA variants, a root-level single-file checkpoint, or the safety checker.

The cache and the network follow huggingface_hub's settings: `HF_HUB_CACHE`/`HF_HOME` for where,
`HF_HUB_OFFLINE=1` for cache only, `HF_TOKEN` for gated repositories. A failure is one line that
says whether the repository, the revision or the network is at fault.
"""

from __future__ import annotations

import re
from pathlib import Path

from diffrt.errors import DiffrtError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
# What diffrt reads from a diffusers repository (a pipeline or one model), nothing else.
ALLOW = ["*.json", "*.txt", "tokenizer/*", "tokenizer_2/*",
         "diffusion_pytorch_model.safetensors", "model.safetensors",
         "*/diffusion_pytorch_model.safetensors", "*/model.safetensors",
         "*diffusion_pytorch_model-*-of-*.safetensors", "*model-*-of-*.safetensors"]  # sharded weights and their index
IGNORE = ["safety_checker/*", "*.fp16*", "*.ema*", "*non_ema*", "*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.h5"]


def is_hub_id(text: str) -> bool:
    """A string that names a hub repository and no local path."""
    return not Path(text).exists() and HUB_ID.match(text) is not None


def missing_path(text: str) -> str | None:
    """For an id-shaped name ('runs/digit') whose first part is a local folder, the line naming it as a path not
    there, with the folder's entries whose names come closest: a mistyped path, more likely than a Hub repository
    (the Hub's own answer is added after it). None when no such folder is here."""
    import difflib

    parent, _, name = text.partition("@")[0].partition("/")
    if not Path(parent).is_dir():
        return None
    try:
        entries = sorted(p.name for p in Path(parent).iterdir() if p.is_dir())
    except OSError:
        entries = []
    close = difflib.get_close_matches(name, entries, n=3)
    hint = f"; did you mean {' or '.join(f'{parent}/{c}' for c in close)}?" if close else ""
    return f"model folder not found: {text} (the folder {parent}/ is here, without {name}{hint})"


def resolve_model(model: str | Path | None) -> Path | None:
    """A local folder as it is; a hub id as its snapshot folder in the Hugging Face cache, fetched
    if needed. None stays None (the shipped digits model)."""
    if model is None:
        return None
    text = str(model)
    if not is_hub_id(text):
        return Path(model)
    match = HUB_ID.match(text)
    repo, revision = match["repo"], match["revision"]
    # A revision is a commit hash, a branch or a tag; huggingface_hub reads (and writes) refs/<revision> in the
    # cache, so one with '..' reached outside it (org/name@../../x named a snapshot folder anywhere).
    if revision is not None and any(part in ("", ".", "..") or part.startswith(".") for part in revision.split("/")):
        raise DiffrtError(f"{text}: {revision!r} is not a revision (a commit hash, branch or tag); check the name after '@'")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import errors as hf_errors
    except ImportError:  # a dependency of diffusers, so present wherever diffrt runs
        raise DiffrtError(f"{text} is not a local folder, and huggingface_hub is not installed to fetch it") from None
    # On a failure, 'runs/digit' beside a folder runs/ is more likely a mistyped path than an id: said first (missing_path),
    # the Hub's answer after.
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=ALLOW, ignore_patterns=IGNORE))
    except hf_errors.RevisionNotFoundError:
        raise DiffrtError(f"{repo} has no revision {revision!r}; check the name after '@'") from None
    except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError):
        local = missing_path(text)
        raise DiffrtError(f"{local}; as a Hub id, not a Hub repository you can read (set HF_TOKEN for a gated or private one)"
                          if local else
                          f"{text} is neither a local folder nor a Hub repository you can read; check the path or id, "
                          "and set HF_TOKEN for a gated or private one") from None
    except hf_errors.LocalEntryNotFoundError:
        local = missing_path(text)
        raise DiffrtError(f"{local}; as a Hub id, not in the Hugging Face cache, and the Hub cannot be reached (offline, or "
                          "HF_HUB_OFFLINE=1)" if local else
                          f"{text} is neither a local folder nor in the Hugging Face cache, and the Hub cannot be reached "
                          "(offline, or HF_HUB_OFFLINE=1); download it once with network, or pass a local folder") from None
    except hf_errors.HfHubHTTPError as exc:
        raise DiffrtError(f"fetching {text} from the Hub failed ({str(exc).splitlines()[0]}); retry, or pass a local folder") from None
    except hf_errors.HFValidationError as exc:  # a path not there yet ('runs/sd--ft') that HUB_ID took for an id
        local = missing_path(text)
        raise DiffrtError(f"{local}; check the path" if local else
                          f"{text} is neither a local folder nor a valid Hugging Face id ({str(exc).splitlines()[0]}); "
                          "check the path") from None
