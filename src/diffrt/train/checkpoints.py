"""The training loop's checkpoints: saving them, finding the newest complete one, loading it, and
what --resume refuses.

A checkpoint is a folder, checkpoints/step-NNNNNNN (CHECKPOINT_DIR) in --out: weights.safetensors,
optimizer.safetensors (AdamW state by parameter name, "<name>::<key>"), [ema.safetensors] and
state.json, which is written last and holds the sha256 of the others beside the step, the optimizer's
param_groups and the run's state (its config, a trainer's settings, the fp16 loss scaler, the losses
since the last loss.csv row). A checkpoint therefore only needs the weights, the optimizer moments and
the step: all randomness of a step comes from a generator seeded by (seed, step, process), and the
learning rate is a pure function of the step (see loop.py).

Atomicity. A checkpoint is assembled under a temporary name and renamed into place, so a half-written
checkpoint is never picked up; one whose files do not match the hashes in its state.json is skipped
with a warning (verify_checkpoint). --checkpoints-total-limit N keeps the newest N complete checkpoints
(--resume needs only the newest); each removed one goes by a rename first, so that a run killed while
removing it leaves a .step-* temporary, never a half-deleted step-* folder. A run killed mid-save
(SIGKILL, a power cut: no `finally` ran) leaves such temporaries, and the trainers' own staging files
and folders, behind; every run removes them at its start, before it writes anything (LEFTOVERS).

The state holds the run's config, which --resume compares with its own (config_changes): every field
but RESUMABLE_FIELDS must match. A fresh run refuses an --out that holds checkpoints, damaged ones too
(TrainConfig.validate).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from diffrt import atomic
from diffrt.errors import DiffrtError

if TYPE_CHECKING:
    from diffrt.train.config import TrainConfig
    from diffrt.train.ema import EMA
    from diffrt.train.loop import TrainResult

log = logging.getLogger(__name__)

# Seven digits or more: step-NNNNNNN from 10,000,000 on has eight (save_checkpoint's {step:07d}), and was not found.
CHECKPOINT_DIR = re.compile(r"^step-(\d{7,})$")

# Fields (of TrainConfig or of a trainer's config) that `--resume` may change: they say how long
# a run goes, what it reports, or how a step is computed (memory, precision), not what it computes.
# (max_steps is the exception: under a linear or cosine schedule it also moves where the decay ends.)
RESUMABLE_FIELDS = frozenset({
    "out", "resume", "max_steps", "checkpoint_every", "checkpoints_total_limit", "sample_every", "log_every",
    "gradient_checkpointing", "mixed_precision", "allow_tf32",
    "sample_steps", "sample_guidance_scale", "num_samples",  # the pixel trainers' sample grids
    "validation_prompt", "num_validation_images", "inference_steps", "guidance_scale",  # DreamBooth's validation images
    "sample_batch_size", "class_inference_steps",  # how class images are made (before a run's first step)
    "folders",  # where the PATH_FIELDS' folders were (trainer_state): a record, read by config_changes
})


def save_checkpoint(folder: Path, step: int, named, optimizer, ema: EMA | None, extra: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = atomic.make_temp_dir(folder, ".step-")
    try:
        files = {"weights.safetensors": {k: p.detach() for k, p in named.items()}}
        files["optimizer.safetensors"], groups = _optimizer_tensors(named, optimizer)
        if ema is not None:
            files["ema.safetensors"] = ema.shadow
        hashes = {}
        for name, tensors in files.items():
            atomic.save_safetensors(tmp / name, tensors)
            hashes[name] = atomic.sha256_file(tmp / name)
        atomic.write_json(tmp / "state.json", {"step": step, "files": hashes, "param_groups": groups, **extra})
        final = folder / f"step-{step:07d}"
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _optimizer_tensors(named, optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW state by parameter name (safetensors cannot hold the nested state_dict as is)."""
    state = optimizer.state_dict()
    by_index = {i: k for i, k in enumerate(named)}
    tensors = {}
    for idx, st in state["state"].items():
        for key, value in st.items():
            tensors[f"{by_index[idx]}::{key}"] = torch.as_tensor(value).detach().clone()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    return tensors, groups


def remove_old_checkpoints(folder: Path, newest: Path, keep: int) -> None:
    """Remove the oldest complete checkpoints beyond the newest `keep` (--checkpoints-total-limit), never
    `newest`, the one just saved.

    Damaged ones are neither counted nor removed: --resume skips them with a warning, and a checkpoint
    that does not verify must not take the place of one that does. Each goes by a rename first, so
    that a run killed while removing it leaves a .step-* temporary (removed at the next start), never
    a half-deleted step-* folder that --resume would have to skip. Verifying hashes the older ones, a
    checkpoint's large files fully once only (atomic.sha256_file remembers them from then on).
    """
    complete = [ckpt for ckpt in list_checkpoints(folder) if ckpt == newest or verify_checkpoint(ckpt) is not None]
    for ckpt in complete[:-keep]:
        if ckpt == newest:
            continue
        doomed = folder / f".{ckpt.name}.old"
        shutil.rmtree(doomed, ignore_errors=True)
        ckpt.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        log.info("removed %s (--checkpoints-total-limit %d)", ckpt, keep)


# The temporaries the trainers' saves stage their outputs in, by the names atomic.make_temp_dir and
# atomic.atomic_path give them (tempfile's, [a-z0-9_]{8}, in earlier versions; hex now), and the old
# folder models.replace_dir swaps out. A run killed mid-save (SIGKILL, a power cut: no `finally` ran)
# leaves them; no reader trusts them, but a saved SD-size model or checkpoint is gigabytes. Only these
# names, in the folders the run writes: --out is the user's choice (it may hold other hidden files),
# so atomic.remove_leftovers (an export's: the temporaries of the files and component folders it writes)
# is not used here.
_TOKEN = r"[a-z0-9_]{8}"  # the random part of a temporary file's name (atomic_path; tempfile's in older versions)
# Staging folders are named by atomic.make_temp_dir (8 hex digits): a looser pattern would take a user's
# `.model.previous` for one. (Files end in `.tmp` as well, which no user names a model folder.)
_HEX = r"[0-9a-f]{8}"
LEFTOVERS = {
    ".": re.compile(rf"^\.(model\.{_HEX}|model\.old|lora-{_HEX}|(loss\.csv|dreambooth\.json)\.{_TOKEN}\.tmp)$"),
    "samples": re.compile(rf"^\.step-\d{{7,}}\.png\.{_TOKEN}\.tmp$"),  # save_grid (atomic_path)
    "checkpoints": re.compile(r"^\.step-"),  # save_checkpoint's staging and remove_old_checkpoints' renames
    "class_images": re.compile(rf"^\.class-\d{{5}}\.png\.{_TOKEN}\.tmp$"),  # DreamBooth's class images, by default here
}


def remove_killed_saves(out: Path) -> None:
    """Remove what interrupted saves left in --out and the folders the run writes in it (see LEFTOVERS);
    a link is never followed, whatever its name.

    Called at the start of every run, fresh or resumed, before it writes anything: no save of its own is
    under way, and the run holds --out's lock (holds_out), so no other run's is either.
    """
    for sub, pattern in LEFTOVERS.items():
        folder = out / sub
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if not pattern.match(path.name) or path.is_symlink():
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted save", path)


OUT_LOCK = ".diffrt-train.lock"


def holds_out(trainer: Callable[[Any], TrainResult]) -> Callable[[Any], TrainResult]:
    """A trainer (taking a config with a `train` TrainConfig) that holds a lock on its --out from its first
    check to its saved result, OUT_LOCK in the folder, and refuses to start while another run holds it.

    Two runs into one --out (a job scheduler retrying a run that is still going, a second shell) would each
    delete the other's staged checkpoint as a killed save's leftover, interleave loss.csv and replace each
    other's checkpoints and result. The lock is an flock: the kernel drops it with its process, so a killed run
    leaves no stale lock. The file stays, except where a refused run removes the folder it made for it; a run
    that opened it meanwhile sees it gone once locked, and locks the new one (atomic.file_lock).
    It is in --out, not beside it, so that every run finds it wherever it may write (an --out that is a mount
    point, its parent read-only); the folder is made once the config's checks have passed. One process of a
    data-parallel run (accelerate's main) takes it. On a filesystem without locks the run goes on, with a warning.
    """
    @functools.wraps(trainer)
    def run(config):
        from accelerate import PartialState

        config.validate()  # bad input (--out inside the model folder too) fails before the lock file is made
        out = Path(config.train.out).resolve()
        made = [folder for folder in (out, *out.parents) if not folder.exists()]  # innermost first
        with contextlib.ExitStack() as held:
            if PartialState(cpu=not torch.cuda.is_available()).is_main_process:
                lock = out / OUT_LOCK
                try:
                    held.enter_context(atomic.file_lock(lock, wait=False))
                    held.callback(_remove_if_unused, out, made)  # on the way out, while the lock is still held
                except atomic.LockHeld as exc:
                    by = f" (process {exc.holder})" if exc.holder else ""
                    raise DiffrtError(f"{config.train.out} is in use by another training run{by}: wait for it to end, "
                                      "or pass another --out") from None
                except (OSError, ImportError) as exc:  # ImportError: no fcntl (Windows)
                    log.warning("could not lock %s (%s): two runs into %s at once would not be stopped", lock, exc,
                                config.train.out)
            config = replace(config, train=config.train.resolved())
            config.train.check_no_earlier_run()
            return trainer(config)

    return run


def _remove_if_unused(out: Path, made: list[Path]) -> None:
    """A run refused past its config's checks (a data folder without images, a model without weights) leaves
    nothing behind, as one refused earlier: the folders made for its lock, `made` (--out and any missing parents,
    innermost first), go while they hold nothing but that lock. A run that wrote anything keeps its --out."""
    if not made or not out.is_dir() or [p.name for p in out.iterdir()] != [OUT_LOCK]:
        return
    (out / OUT_LOCK).unlink(missing_ok=True)
    for folder in made:
        try:
            folder.rmdir()
        except OSError:  # not empty (made meanwhile by someone else), or gone
            return


def list_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints in `folder`, oldest first: by step, not by name (step-10000000 sorts before step-9999999)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if CHECKPOINT_DIR.match(p.name)), key=lambda p: int(CHECKPOINT_DIR.match(p.name)[1]))


CHECKPOINT_FILES = ("weights.safetensors", "optimizer.safetensors", "ema.safetensors")  # what save_checkpoint writes
MAX_STATE_BYTES = 16 << 20  # a state.json holds a config, hashes and a loss window: kilobytes


def verify_checkpoint(ckpt: Path) -> dict | None:
    """The checkpoint's state.json if every file it lists is present with its recorded hash. Only the files
    save_checkpoint writes, as regular files in the checkpoint: a state.json naming /dev/zero, a FIFO or ../ hung
    --resume while it hashed what never ends, or read outside the run."""
    try:
        state_path = ckpt / "state.json"  # a regular file of a state's size: a FIFO or a link to /dev/zero is not read
        if state_path.is_symlink() or not state_path.is_file() or state_path.stat().st_size > MAX_STATE_BYTES:
            return None
        state = json.loads(state_path.read_text())
        files = state["files"]
        if not isinstance(files, dict) or not {"weights.safetensors", "optimizer.safetensors"} <= set(files):
            return None  # what a resume reads is what was checked (the loader reads ema only where it is listed)
        for name, digest in files.items():
            path = ckpt / name
            if name not in CHECKPOINT_FILES or path.is_symlink() or not path.is_file():
                return None
            if atomic.sha256_file(path) != digest:
                return None
        return state
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def config_changes(saved: dict, now: dict) -> list[str]:
    """'name: saved vs now' for each field of `now` that differs from `saved`, but RESUMABLE_FIELDS.

    Both are checkpoint states ({"config": ..., "<trainer>": ...}). A field that an older checkpoint did not
    record is compared with the value that checkpoint trained with (FIELDS_ADDED), or not at all. A folder
    (PATH_FIELDS) is compared by where it is (same_source).
    """
    changes = []
    for key, value in now.items():
        if key in RESUMABLE_FIELDS or (key not in saved and key not in FIELDS_ADDED):
            continue
        was = saved[key] if key in saved else FIELDS_ADDED[key]
        if isinstance(value, dict) and isinstance(was, dict):
            changes += config_changes(was, value)
        elif not (was == value if key not in PATH_FIELDS else same_source(was, value, saved.get("folders", {}).get(key))):
            changes.append(f"{key}: {was!r} saved vs {value!r} now")
    return changes


# Settings added after checkpoints were first written, and what a checkpoint without them trained with: a
# --resume of one asking for another value (--snr-gamma 5 on a run that trained without) is a change like any other.
FIELDS_ADDED = {
    "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "snr_gamma": None, "noise_offset": 0.0,
    "ema_power": 0.0, "ema_inv_gamma": 1.0, "scale_lr": False,  # TrainConfig
    "prediction_type": "epsilon", "beta_schedule": "linear",  # ClassCondConfig
    "lora_dropout": 0.0,  # DreamBoothConfig
}


# Trainer fields that name a folder: one folder spelled another way (./cat/, an absolute path, a relative path
# from another directory than the run's) is no change. trainer_state records where each was ("folders").
PATH_FIELDS = frozenset({"model", "data", "instance_data", "class_data"})


def folders(fields: dict) -> dict[str, str]:
    """The absolute path of each of `fields`' PATH_FIELDS that names a folder here (a bundled dataset's name does
    not; DreamBooth's --class-data is one before its class images are made), as the run reads it: a --resume from
    another directory tells the same folder from another one by it."""
    return {key: str(Path(value).resolve()) for key, value in fields.items()
            if key in PATH_FIELDS and isinstance(value, str) and (Path(value).is_dir() or key == "class_data")}


def same_source(was, now, where: str | None) -> bool:
    """Whether a PATH_FIELDS value `now` names what the checkpoint's run read as `was`: the folder recorded as `where`
    (folders()) while it is there, from whatever directory and however spelled; else (a checkpoint without the record,
    a folder moved with its job) the same spelling, or the same folder spelled another way from here."""
    if where is not None and Path(where).is_dir():
        return same_folder(where, now)
    return was == now or same_folder(was, now)


def same_folder(saved, now) -> bool:
    """Whether two spellings name one existing folder (a relative one read from the current directory, as the
    run reads it; a bundled dataset's name is no folder, and must be spelled the same)."""
    if not (isinstance(saved, str) and isinstance(now, str) and Path(saved).is_dir() and Path(now).is_dir()):
        return False
    return Path(saved).resolve() == Path(now).resolve()


def load_latest_checkpoint(folder: Path, named, optimizer, ema: EMA | None, scaler=None,
                           expected: dict | None = None) -> dict:
    """Load the newest complete checkpoint into the parameters, optimizer, EMA and loss scaler;
    returns its state.json (its "step" among it). `expected` (the run's state, config included)
    must match the saved one."""
    from safetensors.torch import load_file

    ckpt, state = _newest_checkpoint(folder, expected)
    weights = load_file(ckpt / "weights.safetensors")
    missing = set(named) - set(weights)
    if missing:
        raise DiffrtError(f"checkpoint {ckpt} does not match the model: {len(missing)} parameters missing, e.g. {sorted(missing)[:3]}")
    reshaped = [k for k, p in named.items() if weights[k].shape != p.shape]
    if reshaped:
        k = reshaped[0]
        raise DiffrtError(f"checkpoint {ckpt} does not match the model: {k} is {list(weights[k].shape)} there "
                          f"but {list(named[k].shape)} here ({len(reshaped)} parameters differ)")
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(weights[k])
    opt_tensors = load_file(ckpt / "optimizer.safetensors")
    names = list(named)
    opt_state = {"state": {}, "param_groups": []}
    for key, value in opt_tensors.items():
        pname, _, field_name = key.rpartition("::")
        if pname not in named:  # a hand-made file: one line, not a ValueError from list.index
            raise DiffrtError(f"checkpoint {ckpt}: optimizer.safetensors holds {key!r}, which names no parameter of the "
                              "model; resume from another checkpoint")
        opt_state["state"].setdefault(names.index(pname), {})[field_name] = value
    for group in state["param_groups"]:
        opt_state["param_groups"].append({**group, "params": list(range(len(names)))})
    optimizer.load_state_dict(opt_state)
    if ema is not None and "ema.safetensors" in state["files"]:  # verified, as every file read here
        ema.load(load_file(ckpt / "ema.safetensors"), named)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state


TRAINERS = {"class_cond": "class-cond", "finetune": "finetune", "dreambooth": "dreambooth-lora"}  # state key: command


def check_same_trainer(ckpt: Path, saved: dict, expected: dict) -> None:
    """Refuse a --resume by another trainer than the one that wrote the checkpoint: each compares only its own
    section of the state, so a class-cond run resumed by `finetune` (on a model of the same shape) went on
    quietly as another kind of run."""
    was = next((name for key, name in TRAINERS.items() if key in saved), None)
    now = next((name for key, name in TRAINERS.items() if key in expected), None)
    if was is not None and now is not None and was != now:
        raise DiffrtError(f"--resume: {ckpt} is a checkpoint of `diffrt train {was}`, not {now}; resume it with "
                          f"`diffrt train {was} --resume`, or start afresh in an empty --out")


def _newest_checkpoint(folder: Path, expected: dict | None) -> tuple[Path, dict]:
    """The newest complete checkpoint and its state.json; `expected` (a run's state) must match its settings."""
    for ckpt in reversed(list_checkpoints(folder)):
        state = verify_checkpoint(ckpt)
        if state is None:
            log.warning("skipping incomplete or corrupt checkpoint %s", ckpt)
            continue
        if expected:
            check_same_trainer(ckpt, state, expected)
        # Compare as JSON reads it back: tuples come back as lists.
        changes = config_changes(state, json.loads(json.dumps(expected))) if expected else []
        if changes:
            raise DiffrtError(f"--resume: {ckpt} was trained with other settings ({'; '.join(changes)}); "
                              "resume with the saved settings, or start afresh in an empty --out")
        return ckpt, state
    damaged = list_checkpoints(folder)
    if damaged:
        # A fresh run refuses an --out holding checkpoints (TrainConfig.validate), damaged ones too:
        # "run without --resume" would send the user back here.
        raise DiffrtError(f"--resume: no complete checkpoint in {folder}, only {len(damaged)} damaged (newest "
                          f"{damaged[-1].name}); remove {folder} to start afresh in this --out, or choose an empty --out")
    raise DiffrtError(f"--resume: no complete checkpoint in {folder}; run without --resume to start afresh")


def check_resume(config: TrainConfig, extra_state: dict | None = None) -> None:
    """Refuse now a --resume that `train` would refuse (no complete checkpoint, other settings, a
    checkpoint past --max-steps), with the same message; `extra_state` is what the trainer will
    pass to `train`.

    A trainer calls this before its own costly setup: DreamBooth fills its class-image folder with
    the run's settings before the loop starts, so a --resume with another --num-class-images (or a
    newly added --with-prior-preservation) would otherwise generate images into the run's folder
    for minutes or hours and only then be refused.
    """
    if not config.resume:
        return
    _, saved = _newest_checkpoint(Path(config.out) / "checkpoints", {"config": asdict(config), **(extra_state or {})})
    check_max_steps(int(saved["step"]), config)


def check_max_steps(start: int, config: TrainConfig) -> None:
    if start > config.max_steps:
        raise DiffrtError(f"--resume: the newest checkpoint is at step {start}, past --max-steps {config.max_steps}; "
                          f"pass --max-steps {start} or more")
