"""What a training run is asked for (TrainConfig), checked before any model or data loads, and the learning
rate it asks for at each step.

Every field is stored with each checkpoint (checkpoints.py), and `--resume` refuses a run whose fields
differ from it but for those RESUMABLE_FIELDS names.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from diffrt import atomic
from diffrt.errors import DiffrtError

log = logging.getLogger(__name__)

MAX_ACCUMULATION = 64  # loop.step_generator's micro-batch field; TrainConfig.validate holds runs to it
MAX_PROCESSES = 1024  # and its process field

# What a run writes in --out, checked before any model or data loads (TrainConfig.validate, and each trainer's
# validate for its own result): a file where a folder goes failed at its first write (Errno 17), a folder where a
# file goes at its first write (Errno 21: loss.csv's first row, the LoRA after the last step), and a file named
# like the model folder was replaced without a word.
RUN_FOLDERS = ("checkpoints", "samples", "tensorboard")
RUN_FILES = ("loss.csv",)
# A run's results, which only a finished run leaves: a fresh run into an --out holding one (its checkpoints
# removed) would have truncated its loss.csv and deleted its sample grids (TrainConfig.check_no_earlier_run).
RESULTS = ("model", "pytorch_lora_weights.safetensors")  # the pixel trainers' folder, lora_adapters.LORA_WEIGHT_NAME


@dataclass
class TrainConfig:
    out: str
    max_steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2  # AdamW's decoupled weight decay (diffusers' --adam_weight_decay)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_warmup_steps: int = 100
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    scale_lr: bool = False  # the peak rate times the images per step, all processes (diffusers' --scale_lr)
    snr_gamma: float | None = None  # Min-SNR loss weighting (Hang et al. 2023; diffusers' --snr_gamma, 5.0 there)
    noise_offset: float = 0.0  # offset noise: a per-channel constant added to the noise (diffusers' --noise_offset)
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    allow_tf32: bool = False  # Ampere and later: fp32 matmuls and convolutions in TF32 (diffusers' --allow_tf32)
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0  # 0 disables EMA
    ema_power: float = 0.0  # > 0: diffusers' EMAModel power warm-up (use_ema_warmup), 3/4 in train_unconditional.py
    ema_inv_gamma: float = 1.0  # that warm-up's inverse multiplicative factor
    max_grad_norm: float = 1.0
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = None  # keep the newest N complete checkpoints; None keeps them all
    sample_every: int = 0  # 0: only at the end
    log_every: int = 10  # loss.csv and TensorBoard get one row per N steps: their mean loss
    seed: int = 0
    resume: bool | Literal["auto"] = False  # "auto": resume where --out holds a checkpoint, else start a new run

    def validate(self) -> None:
        if not str(self.out).strip():  # Path("") is the current folder: the run's files would land where it stands
            raise DiffrtError("--out is empty; give the run's folder")
        if not (isinstance(self.resume, bool) or self.resume == "auto"):
            raise DiffrtError(f"resume must be True, False or 'auto', got {self.resume!r}")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise DiffrtError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        # 0 means no warmup, a grid at the end only; a negative value meant, silently, a cosine started
        # part-way down and a grid after every step (n % -1 == 0).
        for name in ("lr_warmup_steps", "sample_every"):
            if getattr(self, name) < 0:
                raise DiffrtError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.gradient_accumulation_steps > MAX_ACCUMULATION:
            raise DiffrtError(f"--gradient-accumulation-steps must be <= {MAX_ACCUMULATION}, got "
                              f"{self.gradient_accumulation_steps}; raise --batch-size instead")
        # Written as "not ok" so that NaN, which every comparison calls False, is refused too (AdamW raised it later).
        if not 0 < self.learning_rate < math.inf:
            raise DiffrtError(f"--learning-rate must be a number > 0, got {self.learning_rate}")
        if not 0 <= self.weight_decay < math.inf:
            raise DiffrtError(f"--adam-weight-decay must be a number >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise DiffrtError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.adam_epsilon < math.inf:
            raise DiffrtError(f"--adam-epsilon must be a number > 0, got {self.adam_epsilon}")
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise DiffrtError(f"--lr-schedule must be constant, linear or cosine, got {self.lr_schedule!r}")
        if self.snr_gamma is not None and not 0 < self.snr_gamma < math.inf:
            raise DiffrtError(f"--snr-gamma must be a number > 0 (5.0 is the paper's), got {self.snr_gamma}; "
                              "leave it out for the plain loss")
        if not 0 <= self.noise_offset < math.inf:
            raise DiffrtError(f"--noise-offset must be a number >= 0 (0.05-0.1 are usual; 0: off), got {self.noise_offset}")
        if not 0 <= self.max_grad_norm <= math.inf:
            raise DiffrtError(f"--max-grad-norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise DiffrtError(f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if not -(2**63) <= self.seed < 2**63:
            raise DiffrtError(f"--seed must fit in 64 bits (torch's seeds), got {self.seed}")
        if not 0 <= self.ema_decay < 1:
            raise DiffrtError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.ema_power < math.inf or not 0 < self.ema_inv_gamma < math.inf:
            raise DiffrtError(f"--ema-power must be >= 0 (0: the (1 + n) / (10 + n) warm-up) and --ema-inv-gamma > 0, "
                              f"got {self.ema_power} and {self.ema_inv_gamma}")
        if self.ema_decay == 0 and (self.ema_power or self.ema_inv_gamma != 1.0):
            raise DiffrtError("--ema-power and --ema-inv-gamma shape the warm-up of an EMA, which --ema-decay turns on: "
                              "pass --ema-decay too (its ceiling: 0.9999 in diffusers' train_unconditional.py)")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise DiffrtError(f"--checkpoints-total-limit must be >= 1 (a run keeps at least the checkpoint it just saved), "
                              f"got {self.checkpoints_total_limit}; leave it out to keep every checkpoint")
        try:  # TensorBoard names its event files by a UTF-8 path: a name of other bytes failed after the model loaded
            str(self.out).encode("utf-8")
        except UnicodeEncodeError:
            raise DiffrtError(f"--out {self.out!r} is not valid UTF-8 (TensorBoard, which the run logs to, cannot name its "
                              "files there); choose a name in UTF-8") from None
        # Before the model and data load (and, for DreamBooth, class images are generated): a file in the way of
        # --out, or a folder this user cannot write, failed at the first mkdir with an OSError.
        atomic.check_writable(self.out, folder=True)
        check_out_paths(self.out, folders=RUN_FOLDERS, files=RUN_FILES)

    def resolved(self) -> TrainConfig:
        """The config with `--resume auto` decided: resume where --out holds checkpoints (damaged ones too: --resume
        then says what to do with them), else start a new run. One command line then serves every attempt of a
        job (a scheduler requeuing it after a preemption), as diffusers' `--resume_from_checkpoint latest` does.
        Decided under --out's lock (checkpoints.holds_out), where no other run adds or removes checkpoints."""
        from diffrt.train.checkpoints import list_checkpoints

        if self.resume != "auto":
            return self
        found = bool(list_checkpoints(Path(self.out) / "checkpoints"))
        if not found:
            log.info("--resume auto: %s holds no checkpoint yet; starting a new run", self.out)
        return replace(self, resume=found)

    def check_no_earlier_run(self) -> None:
        """A fresh run refuses an --out holding another run's checkpoints (a later --resume would take them up), or
        the result of a finished one (RESULTS) whose checkpoints are gone: it would have truncated that run's loss.csv,
        deleted its sample grids as a killed run's and replaced its result. A loss.csv alone is what a run killed
        before its first checkpoint leaves, which a new run (`--resume auto`: a requeued job) starts over.
        Checked under --out's lock (checkpoints.holds_out): a run still going there is named as such instead."""
        from diffrt.train.checkpoints import list_checkpoints

        if self.resume:
            return
        existing = list_checkpoints(Path(self.out) / "checkpoints")
        if existing:
            raise DiffrtError(f"{self.out} already holds checkpoints of an earlier run (newest {existing[-1].name}); "
                              "pass --resume to continue that run, or choose an empty --out for a new one")
        result = next((Path(self.out) / name for name in RESULTS if os.path.lexists(Path(self.out) / name)), None)
        if result is not None:
            raise DiffrtError(f"{self.out} already holds a finished run ({result}) and no checkpoint to resume it from: a new "
                              f"run there would replace it and its loss.csv and samples; choose another --out, or remove {result} first")


# Each trainer's defaults where they differ from TrainConfig's, after the recipes they follow (README): the trainers'
# configs take their `train` default from here, and `diffrt train`'s options theirs (cli._add_train_options), so that a
# run from Python trains as the command does. This module imports no torch, for the CLI to read them before a command runs.
TRAINER_DEFAULTS = {
    "class-cond": dict(out="runs/class-cond", max_steps=2000, batch_size=64),  # the shipped digits model's run
    "finetune": dict(out="runs/finetune", max_steps=1000, batch_size=16, learning_rate=1e-4),
    # diffusers' DreamBooth-LoRA recipe: 1e-4, constant, no warm-up (TrainConfig's own default is cosine)
    "dreambooth-lora": dict(out="runs/dreambooth-lora", max_steps=500, batch_size=1, learning_rate=1e-4, lr_warmup_steps=0,
                            lr_schedule="constant"),
}


def trainer_defaults(trainer: str, **settings) -> TrainConfig:
    """`diffrt train <trainer>`'s TrainConfig, with `settings` over its defaults: e.g.
    `ClassCondConfig(train=trainer_defaults("class-cond", out="runs/digits"))` trains as the command does."""
    return TrainConfig(**{**TRAINER_DEFAULTS[trainer], **settings})


def check_out_paths(out: str | Path, folders=(), files=()) -> None:
    """Refuse, before the run starts, a file where it keeps one of `folders` in --out, or a folder where it writes one of
    `files`: found only when first written, mid-run or after its last step."""
    for name in folders:
        path = Path(out) / name
        if path.exists() and not path.is_dir():
            raise DiffrtError(f"{path} is a file where the run keeps its {name}; move it, or choose another --out")
    for name in files:
        path = Path(out) / name
        if path.is_dir():
            raise DiffrtError(f"{path} is a folder where the run writes its {name}; move it, or choose another --out")


def trainer_state(config) -> dict:
    """A trainer's config as checkpoint state: its fields without its TrainConfig (stored as "config"), and where
    the folders it names are ("folders": a --resume may name them from another directory, or another way)."""
    from diffrt.train.checkpoints import folders

    fields = {k: v for k, v in asdict(config).items() if k != "train"}
    return {**fields, "folders": folders(fields)}


def images_per_step(config: TrainConfig, num_processes: int) -> int:
    """The images one optimizer step trains on: --batch-size is each micro-batch's, on each process."""
    return config.batch_size * config.gradient_accumulation_steps * num_processes


def peak_learning_rate(config: TrainConfig, num_processes: int) -> float:
    """The rate the schedule peaks at: --learning-rate, or with --scale-lr, per image, times the images of a step
    (diffusers' --scale_lr)."""
    return config.learning_rate * images_per_step(config, num_processes) if config.scale_lr else config.learning_rate


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to the peak rate, then constant, or a linear or cosine decay to zero at max_steps."""
    if step < config.lr_warmup_steps:
        return config.learning_rate * (step + 1) / config.lr_warmup_steps
    if config.lr_schedule == "constant":
        return config.learning_rate
    progress = min(1.0, (step - config.lr_warmup_steps) / max(1, config.max_steps - config.lr_warmup_steps))
    if config.lr_schedule == "linear":
        return config.learning_rate * (1 - progress)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def check_out_apart(out: str | Path, model: str | Path, result: str) -> None:
    """Refuse an --out that overlaps the --model folder a trainer reads: `out` itself, or its `result`
    (the trained model's subfolder or file), at or inside it.

    Inside the model folder the run writes its checkpoints, logs and samples among the model's files
    (which `diffrt export` then hashes); with `out/result` the model folder itself (--model runs/a/model
    --out runs/a), the saved result replaced the base model, and every file of it the trainer does not
    write (a README, sample images), without a word.
    """
    where, folder = Path(out).resolve(), Path(model).resolve()
    if where == folder or folder in where.parents:
        raise DiffrtError(f"--out {out} is {'' if where == folder else 'inside '}the --model folder {model}: the run "
                          "would write its checkpoints, logs and samples among the model's files; pass an --out outside it")
    target = where / result
    if target == folder or target in folder.parents:
        raise DiffrtError(f"--out {out} would replace the --model folder {model} with the trained {result}; "
                          "pass another --out (the base model stays as it is)")
