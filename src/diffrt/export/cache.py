"""An export's cache: the content-addressed keys, the hit that does no work, and the rebuild that keeps what
it can.

Exporting again with unchanged inputs is a cache hit that does no work and says so (an export
that asks for the parity check is no hit on one made with --no-verify). A rebuild takes the
folder's lock, looks again (another builder may have finished the same export while it waited),
then builds the new export beside the old one, in a staging folder, and moves it into place only
when it has finished: a rebuild that fails or is stopped leaves the previous export as it was,
running (`Rebuild`). A text-to-image rebuild keeps each old component whose own inputs are unchanged
(its `component_key`) and whose files still hash as recorded, files and manifest entry, and
exports only the others: adding --vae-encoder builds one engine, not four (`begin_rebuild`).

The manifest's "key" is the key of the base export, without LoRA, and "loras" is the LoRA state the
artifact runs with (baked in, or refit into the engines); an export is a cache hit only when both match.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from diffrt import atomic
from diffrt.components import ComponentSpec, spec_to_dict
from diffrt.errors import ArtifactError, DiffrtError
from diffrt.export import manifest as mf
from diffrt.export.lora import locate_lora
from diffrt.export.options import TORCH_DTYPES, ExportOptions, ExportResult, Precision

log = logging.getLogger(__name__)

COMPONENT_FOLDERS = ("unet", "text_encoder", "unet_controlnet", "controlnet", "vae_decoder", "vae_encoder")  # what exports write


def lora_hashes(options: ExportOptions) -> list[dict]:
    """Each LoRA of the export as its manifest entry records it: the file's absolute path (so that the
    artifact's PyTorch fallbacks and refits find it from any working directory), sha256 and scale."""
    files = [locate_lora(Path(p)).resolve() for p, _ in options.loras]
    return [{"path": str(f), "sha256": atomic.sha256_file(f), "scale": s} for f, (_, s) in zip(files, options.loras)]


def export_key(model_parts: dict, options: ExportOptions) -> str:
    """The content address of the base export: what the model is, plus what every export depends
    on (opset, backend, library versions, and the GPU for engines). LoRA is kept apart: see
    `cached_export`."""
    return mf.cache_key({
        **model_parts, "opset": options.onnx_opset, "backend": options.backend,
        # Only a non-default exporter enters the key, so artifacts (and hours of engine builds) made
        # before the choice existed stay cache hits.
        **({"exporter": options.exporter} if options.exporter != "torchscript" else {}),
        "versions": mf.library_versions(), "gpu": mf.gpu_identity() if options.backend == "tensorrt" else None,
    })


def raise_changed(source: Path) -> None:
    """A source whose files changed between their hashing (the key) and the loading of its weights: the export would
    record one model and hold another, and be a cache hit on the first for ever after."""
    raise DiffrtError(f"{source} changed while it was being exported (a training run saving into it?); export again once "
                      "it is written")


def check_loras_unchanged(fused, parts: list[dict]) -> None:
    """The LoRA files fused (FusedLora or its dict) are those hashed for the key (lora_hashes): a file rewritten in
    between (a training run saving its checkpoint to the same path) was fused and recorded under the old file's hash,
    and the artifact a cache hit on that file for ever after, holding other weights."""
    for lora, part in zip(fused, parts):
        sha = lora["sha256"] if isinstance(lora, dict) else lora.sha256
        if sha != part["sha256"]:
            raise DiffrtError(f"{part['path']} changed while it was being exported (a training run saving into it?); "
                              "export again once it is written")


def lora_state(entries) -> list[tuple[str, float]]:
    """What identifies a LoRA setting: each file's sha256 and scale, in order."""
    return [(e["sha256"], float(e["scale"])) for e in entries]


def cached_export(out: Path, key: str, t0: float, loras: list[dict] = (), verified: bool = False,
                  quiet: bool = False, sources: dict | None = None, locked: bool = False) -> ExportResult | None:
    """The finished export at `out` if it has this base key, runs with these LoRAs ([{sha256, scale}]),
    was checked against PyTorch when `verified` asks for it, and its files are intact; else None.
    `quiet`: do not log why it is a miss (a second look, already explained).

    A hit whose inputs were given from other paths than it records (`sources`: the source folder's
    {"path"} and, for text-to-image, {"controlnets"}; the LoRAs' "path") records the new ones: the same
    content moved is no rebuild, but a manifest naming the old folder would send every PyTorch fallback
    (eager backend, guidance, img2img without an exported encoder) to a folder that is gone. `locked`:
    the caller holds the artifact's lock (that record is written under it)."""
    try:
        manifest = mf.read_manifest(out)
        if manifest.get("key") != key:
            return None
        if lora_state(manifest.get("loras", [])) != lora_state(loras):
            if not quiet:
                log.info("%s holds this export with other LoRAs (%d file(s)); rebuilding", out, len(manifest.get("loras", [])))
            return None
        if verified and any("parity" not in comp for comp in manifest["components"].values()):
            # An export made with --no-verify was never compared with PyTorch: asked to verify, it is no hit.
            if not quiet:
                log.info("%s holds this export unverified (--no-verify); rebuilding it with the parity check", out)
            return None
        mf.verify_files(out, manifest)
    except ArtifactError:
        return None
    if sources is not None and _moved(manifest, sources, loras):
        try:
            if not locked:
                with mf.artifact_lock(out):
                    return cached_export(out, key, t0, loras, verified, quiet, sources, locked=True)
            manifest = _record_paths(out, manifest, sources, loras)
        except OSError as exc:  # a read-only artifact still runs on its exported files
            log.warning("%s: its source or LoRA files moved since export, but the new paths cannot be recorded (%s); "
                        "PyTorch fallbacks will look for the old ones", out, exc)
    if (out / STAGE).exists() or (out / REBUILD).exists():
        if not locked:
            # A re-export of other settings may be running: its end, which the lock waits for, may replace the manifest
            # read above (a hit on the old export was reported while the folder held the new one). Looked at again
            # under the lock, where the stage is the leftover of a failed or stopped one.
            try:
                with mf.artifact_lock(out):
                    return cached_export(out, key, t0, loras, verified, True, sources, locked=True)
            except OSError as exc:  # a read-only artifact: no export runs there
                log.warning("%s: cannot lock it to look at what an unfinished export left in %s/ (%s)", out, STAGE, exc)
        else:
            _drop_unfinished_rebuild(out, locked)
    log.info("cache hit: %s already holds this export (key %s); nothing to do", out, key[:12])
    return ExportResult(out, True, manifest, time.perf_counter() - t0)


def _drop_unfinished_rebuild(out: Path, locked: bool) -> None:
    """On a hit, the staging folder and record a failed or stopped re-export of other settings left (gigabytes no
    manifest names; the manifest rules): removed, under the artifact's lock."""
    try:
        with contextlib.nullcontext() if locked else mf.artifact_lock(out):
            if not (out / mf.MANIFEST).is_file():  # another export is moving its stage into place: its own
                return
            size = sum(p.stat().st_size for p in (out / STAGE).rglob("*") if p.is_file()) if (out / STAGE).is_dir() else 0
            _remove(out / STAGE, out)
            (out / REBUILD).unlink(missing_ok=True)
            log.info("%s: removed what an unfinished export of other settings left (%.0f MB)", out, size / 1e6)
    except OSError as exc:  # a read-only artifact still runs on its exported files
        log.warning("%s: cannot remove what an unfinished export left in %s/ (%s)", out, STAGE, exc)


def _moved(manifest: dict, sources: dict, loras: list[dict]) -> bool:
    """Whether a hit's inputs (same content) now sit at other paths than its manifest records."""
    recorded = manifest["source"]
    return (any(recorded.get(name) != value for name, value in sources.items())
            or [e.get("path") for e in manifest["loras"]] != [e.get("path") for e in loras])


def _record_paths(out: Path, manifest: dict, sources: dict, loras: list[dict]) -> dict:
    """The manifest with the inputs' new paths, written (under the artifact's lock): the source's, and each
    LoRA's, in `loras` and in `onnx_loras` (the same files by sha256: a refit engine's LoRAs are not baked)."""
    where = {e["sha256"]: e["path"] for e in loras}
    entries = {field_: [{**e, "path": where.get(e["sha256"], e.get("path"))} for e in manifest[field_]]
               for field_ in ("loras", "onnx_loras") if field_ in manifest}
    moved = {**manifest, "source": {**manifest["source"], **sources}, **entries}
    mf.write_manifest(out, moved)
    log.info("%s: its source or LoRA files moved since export (same content); recorded their new paths", out)
    return mf.read_manifest(out)


def component_key(spec: ComponentSpec, precision: Precision, sources: dict[str, str], baked: list[dict],
                  options: ExportOptions) -> str:
    """The content address of one component's files, stored in its manifest entry, so that a rebuild keeps
    the components whose inputs it did not change (`begin_rebuild`). Exactly what determines the files:

      name, spec (at the component's dtype) and precision   the graph's inputs, outputs, ranges and types;
      sources       the sha256 of the source parts traced into it, and only those: a new VAE does not
                    touch the UNet, the tokenizer touches no graph (its max_length is in the spec);
      baked         the LoRAs fused into its weights, in order ({sha256, scale}): only ONNX-only exports
                    bake, and only into the components a file patches; TensorRT engines are built from the
                    base weights and take LoRA by refit (refit_before_manifest), so theirs is empty;
      backend, exporter, opset   which graph is traced and whether an engine is built from it;
      versions (+ the GPU for engines)   what export_key holds: torch and onnx write the graph, TensorRT
                    and the GPU the engine, diffrt the export code.

    Not in it: --no-verify (a rule, not a key: a verified entry stands in for an unverified request,
    never the reverse, as in `cached_export`), and external_data_threshold, a layout choice the artifact
    key leaves out as well (a component kept keeps its layout, as a cache hit keeps the whole artifact's)."""
    return mf.cache_key({
        "name": spec.name, "spec": spec_to_dict(spec, TORCH_DTYPES[precision]), "precision": precision,
        "sources": sources, "baked": [{"sha256": b["sha256"], "scale": float(b["scale"])} for b in baked],
        "backend": options.backend, "exporter": options.exporter, "opset": options.onnx_opset,
        "versions": mf.library_versions(), "gpu": mf.gpu_identity() if options.backend == "tensorrt" else None,
    })


# A rebuild writes the new export into STAGE, a folder inside the artifact, and moves it into place only once every
# component is built, checked against PyTorch and refit (`Rebuild.finish`): until then the previous export stays whole
# and runs, so a rebuild that fails (a parity check, an engine out of memory) or is stopped loses nothing. The
# components it keeps are hard-linked into STAGE (copied where links fail), so that STAGE is the whole new artifact
# and a refit of a kept engine replaces the staged file, never the running one.
STAGE = ".staging"

# A rebuild's record, beside the manifest: the component entries it has in STAGE (kept, or finished) and the component
# folders of the artifact it owns (the previous export's, and those it may write). Kill safety: a rebuild stopped midway
# leaves the previous manifest and this record, so a rerun reuses what the stopped one finished (minutes per engine)
# instead of building it again; one stopped while it moves STAGE into place (no manifest then, for a moment) leaves the
# record alone, which names the folders the rerun owns and the entries it may find in STAGE or already moved. Written
# atomically under the lock, at the start and after each finished component; nothing but a rebuild reads it, and a
# rebuild trusts an entry only as it trusts a manifest's: its component key must be the one asked for and every file it
# lists must still hash as recorded (a folder the stopped export was writing fails that check and is rebuilt). It is
# removed once the new manifest is written.
REBUILD = ".rebuild.json"


def _previous(out: Path) -> tuple[dict, set[str]]:
    """The previous export's component entries (files in `out`) and the component folders it owns, from its manifest."""
    try:
        manifest = mf.read_manifest(out)
    except ArtifactError:
        return {}, set()
    components = manifest["components"]
    # Its tokenizer too: an export of a pixel model over it would otherwise leave the copy no manifest names.
    tokenizer = ["tokenizer"] if isinstance(manifest["pipeline"].get("tokenizer"), dict) else []
    return components, {name for name in components if name in COMPONENT_FOLDERS} | set(tokenizer)


def _recorded(out: Path) -> tuple[dict, set[str]]:
    """The entries and folders a stopped rebuild recorded (REBUILD), else none."""
    try:
        record = json.loads((out / REBUILD).read_text())
        components, folders = record["components"], record["folders"]
        if isinstance(components, dict) and isinstance(folders, list):
            return components, {name for name in folders if name in (*COMPONENT_FOLDERS, "tokenizer")}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {}, set()


def _reusable(root: Path, name: str, entry, key: str, options: ExportOptions) -> bool:
    """Whether the entry of component `name`, its files under `root`, may stand for the new one: same component key
    (entries from before component keys have none: rebuilt), checked against PyTorch if this export asks for it, every
    file intact."""
    if not isinstance(entry, dict) or entry.get("component_key") != key:
        return False
    if options.verify and "parity" not in entry:
        log.info("%s: %s was exported unverified (--no-verify); rebuilding it with the parity check", root, name)
        return False
    if not isinstance(entry.get("files"), dict):
        return False
    try:
        mf.verify_files(root, {"components": {name: entry}, "pipeline": {}}, [name])
    except ArtifactError as exc:
        log.info("%s: not reusing %s: %s", root, name, exc)
        return False
    return True


def write_rebuild_record(out: Path, components: dict, folders) -> None:
    """REBUILD: the entries a stopped rebuild may reuse and the folders it owns (under the lock)."""
    atomic.write_json(out / REBUILD, {"components": components, "folders": sorted(folders)})


def _link_tree(src: Path, dst: Path) -> None:
    """`src` at `dst` without copying its bytes where the file system allows it (hard links)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:  # a file system without hard links, or another device: a copy
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link)


def _move(src: Path, dst: Path) -> None:
    os.replace(src, dst)  # a rename: one folder of gigabytes moves in no time


def _remove(path: Path, out: Path) -> None:
    """Remove a folder of the artifact, and say so when it cannot be removed (no manifest or record will name it)."""
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():  # a file held open elsewhere, a permission
        log.warning("%s: could not remove %s/ (in use, or not ours to delete); remove it by hand", out, path.relative_to(out))


@dataclass
class Rebuild:
    """A rebuild under way (begin_rebuild): write the new components into `stage`, `record` each one finished, then
    `finish` with the new manifest."""

    out: Path
    stage: Path
    kept: dict  # the previous components reused as they are, entry by name (their files already in `stage`)
    folders: set[str]  # the component folders of `out` this rebuild owns: the previous export's and those it may write

    def record(self, finished: dict) -> None:
        """After each finished component: a rerun after a kill reuses it."""
        write_rebuild_record(self.out, {**self.kept, **finished}, self.folders)

    def finish(self, manifest: dict) -> dict:
        """Move the staged artifact into place and write its manifest (last: the artifact is trusted from then on);
        return the manifest as written. The moves are renames, so the artifact is without a manifest for moments."""
        out, stage = self.out, self.stage
        self.record(manifest["components"])  # what a kill during the moves finds, in `stage` or already in `out`
        replaced = stage / ".replaced"
        replaced.mkdir(exist_ok=True)
        (out / mf.MANIFEST).unlink(missing_ok=True)
        staged = {p.name for p in stage.iterdir() if p.is_dir() and p != replaced}
        for name in sorted(staged | self.folders):
            if (out / name).exists():
                _move(out / name, replaced / name)
            if name in staged:
                _move(stage / name, out / name)
        mf.write_manifest(out, manifest)
        (out / REBUILD).unlink(missing_ok=True)  # after the manifest: a kill between the two leaves the manifest, which rules
        _remove(stage, out)
        return mf.read_manifest(out)  # under the lock: another builder may replace it once it is released


def begin_rebuild(out: Path, key: str, t0: float, loras: list[dict], options: ExportOptions, sources: dict,
                  component_keys: dict[str, str] | None = None, writes: tuple[str, ...] = ()) -> tuple[ExportResult | None, Rebuild | None]:
    """Under the artifact's lock: (the export another builder finished while this one waited for the lock, None) (a
    hit, no second build); else (None, the rebuild), its STAGE made ready: holding the previous components it keeps
    and nothing else. The previous export is left as it is until `Rebuild.finish`.

    `component_keys` ({name: component_key} of the new export): a component whose entry has that key and whose files
    verify is kept, one a stopped rebuild left in STAGE first, else the previous export's (`_reusable`); None (pixel
    exports) keeps none. `writes`: the component folders the export writes besides those (the record names them, so
    that a rerun after a kill knows them for its own). `sources`: the paths of the export's inputs, recorded anew on a
    hit (cached_export)."""
    hit = cached_export(out, key, t0, loras, verified=options.verify, quiet=True, sources=sources, locked=True)
    if hit is not None:
        return hit, None
    stage = out / STAGE
    previous, owned = _previous(out)
    recorded, recorded_folders = _recorded(out)
    if not (out / mf.MANIFEST).is_file():
        owned |= recorded_folders  # stopped while moving its stage into place: what it owned, it still owns
    wanted = component_keys or {}
    kept, linked = {}, []  # linked: the kept components that are the previous export's, not already staged
    for name in wanted:
        for entry, root in ((recorded.get(name), stage), (recorded.get(name), out), (previous.get(name), out)):
            if entry is not None and _reusable(root, name, entry, wanted[name], options):
                kept[name] = entry
                if root == out:
                    linked.append(name)
                break
    stage.mkdir(parents=True, exist_ok=True)
    for path in stage.iterdir():  # what a stopped rebuild staged that this one does not keep as staged
        if path.name not in kept or path.name in linked:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    for name in linked:
        _link_tree(out / name, stage / name)
    ours = (out / mf.MANIFEST).is_file() or (out / REBUILD).is_file()  # an export's folder, not only the user's
    rebuild = Rebuild(out, stage, kept, {*owned, *wanted, *writes})
    rebuild.record({})
    folders, files = {*COMPONENT_FOLDERS, "tokenizer", *rebuild.folders}, (mf.MANIFEST, REBUILD)
    for folder in (out, stage) if ours else (stage,):
        removed = atomic.remove_leftovers(folder, folders, files)
        if removed:
            log.info("%s: removed %d temporary file(s) an interrupted export left: %s", folder, len(removed), ", ".join(removed))
    return None, rebuild
