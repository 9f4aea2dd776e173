"""The one training loop every trainer shares.

A trainer hands the loop a module, a loss function of (micro-batch index, generator) and
callbacks to sample and save; the loop owns devices and precision (accelerate), gradient
accumulation, clipping, AdamW with a warmup then constant, linear or cosine learning rate, EMA,
checkpoints, sample grids, logs and progress, and a clean stop on SIGINT/SIGTERM (stop.py).

Exact resume. All randomness of step s (batch choice, augmentation, noise, timesteps, and the
dropout masks that torch draws from its global generators) comes from a generator seeded by
(seed, s, process); the learning rate is a pure function of s. A checkpoint therefore only
needs the weights, the optimizer moments and s, and a resumed run computes bit for bit the same
next loss as an uninterrupted one. A resumed run must therefore also compute the same thing:
`--resume` refuses a config that changes the model, the optimizer or the data (see
RESUMABLE_FIELDS in checkpoints.py; trainers record their data's image count beside its name),
and a fresh run refuses an --out that holds checkpoints (a later --resume would pick up their
stale higher-numbered steps).

On a GPU "bit for bit" also needs deterministic kernels, which the loop does not force (PyTorch's
reproducibility notes: cuDNN may choose non-deterministic convolution backward algorithms, and some
CUDA kernels accumulate with atomics), so a resumed run there matches an uninterrupted one to
float rounding.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from diffrt import atomic
from diffrt.errors import DiffrtError, TrainingInterrupted
from diffrt.train.checkpoints import (check_max_steps, list_checkpoints, load_latest_checkpoint, remove_killed_saves,
                                     remove_old_checkpoints, save_checkpoint)
from diffrt.train.config import MAX_ACCUMULATION, MAX_PROCESSES, TrainConfig, images_per_step, lr_at, peak_learning_rate
from diffrt.train.data_parallel import average_gradients
from diffrt.train.ema import EMA
from diffrt.train.stop import StopRequests

log = logging.getLogger(__name__)




def step_generator(seed: int, step: int, micro: int = 0, process: int = 0) -> torch.Generator:
    """The generator for one micro-batch: a pure function of its coordinates, distinct for every
    (step, micro < MAX_ACCUMULATION, process < MAX_PROCESSES) of a seed.

    The layout is taken modulo 2^64, the range of torch's seeds: a --seed from about 2.8e8 on
    (1234567890, a timestamp) would otherwise overflow manual_seed at the first step. Below that,
    and for negative seeds (which torch itself takes modulo 2^64), the generators are unchanged.
    """
    if not (0 <= micro < MAX_ACCUMULATION and 0 <= process < MAX_PROCESSES):
        raise ValueError(f"micro-batch {micro} / process {process} outside the seed layout "
                         f"({MAX_ACCUMULATION} micro-batches, {MAX_PROCESSES} processes)")
    return torch.Generator().manual_seed(
        (((seed * 1_000_003 + step) * MAX_ACCUMULATION + micro) * MAX_PROCESSES + process) % 2**64)


GLOBAL_RNG_OFFSET = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: any odd constant would do


@contextlib.contextmanager
def _global_rng_from(g: torch.Generator, device: torch.device) -> Iterator[None]:
    """Run one micro-batch with torch's global generators (the CPU's and the device's) seeded from its
    generator `g`, and give the caller's global state back after.

    Dropout (a pretrained UNet2DModel's `dropout`, e.g. 0.1; peft's lora_dropout) draws its masks from
    the global generators, never from `g`: left as they were, its masks made neither a rerun with the
    same --seed nor a --resume repeat the uninterrupted run. The seed is `g`'s own moved by a constant
    (taken modulo 2^64 as step_generator's), so the masks are not drawn from the stream of `g`'s draws;
    `g` itself is not touched, so models without dropout train exactly as before.

    Exactly the generators that fork_rng restores are seeded (torch.manual_seed would reseed every
    CUDA device's and MPS's too, and leave them changed): the CPU's and, on CUDA, the training
    device's. On other accelerators (MPS) dropout masks keep their global stream, so reruns there
    repeat only up to those masks.
    """
    with seeded_global_rng((g.initial_seed() + GLOBAL_RNG_OFFSET) % 2**64, device):
        yield


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """torch's global generators seeded with `seed` for the block, the CPU's and, for a CUDA `device`, that device's,
    and given back as they were after: torch.manual_seed inside fork_rng(devices=[]) would reseed every CUDA device's
    generator too (and MPS's) and leave them changed."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    index = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else None
    with torch.random.fork_rng(devices=[] if index is None else [index]):
        torch.random.default_generator.manual_seed(seed)
        if index is not None:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)  # this device's generator only (lazy-safe, unlike default_generators)
        yield


LossFn = Callable[[int, torch.Generator], torch.Tensor]
SampleFn = Callable[[], torch.Tensor]  # images [N, C, H, W] in [0, 1]
SaveFn = Callable[[Path], None]


@dataclass
class TrainResult:
    out: Path
    steps: int
    start_step: int  # where this call began: 0, or the checkpoint's step after --resume
    losses: list[float]  # one per optimizer step this call ran: steps start_step + 1 ... steps
    seconds: float  # wall time of the loop, checkpoints and sample grids included
    samples_per_second: float  # the run's, all processes', over the optimizer steps alone (forward, backward, update, EMA)
    step_seconds: list[float] = field(default_factory=list)  # each of those steps' own time, for medians (bench_train.py)


def train(
    config: TrainConfig,
    model: nn.Module,
    loss_fn: LossFn,
    save_fn: SaveFn,
    sample_fn: SampleFn | None = None,
    sample_nrow: int = 8,
    extra_state: dict | None = None,
) -> TrainResult:
    """Run (or resume) training of `model`'s trainable parameters; returns the losses of its steps."""
    # 1. Config, devices, optimizer.
    config.validate()
    config = config.resolved()
    config.check_no_earlier_run()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = _accelerator(config.mixed_precision)
    if config.mixed_precision == "fp16" and accelerator.scaler is None:  # fp32 ran (_accelerator said so): recorded so
        config = replace(config, mixed_precision="no")
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise DiffrtError("the model has no trainable parameters")
    # --scale-lr: the rate given is per image; the schedule peaks at it times the images of one step, as diffusers'.
    # --batch-size is each process's: a step of the run trains num_processes times as many images.
    per_step = images_per_step(config, accelerator.num_processes)
    schedule = replace(config, learning_rate=peak_learning_rate(config, accelerator.num_processes))
    optimizer = torch.optim.AdamW(named.values(), lr=schedule.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_epsilon, weight_decay=config.weight_decay)
    # The model is placed, not wrapped: trainers call their own modules (a UNet, a peft adapter
    # inside a pipeline), which DDP's wrapper would bypass. Data-parallel gradients are averaged
    # across processes explicitly after the accumulated backward passes instead (data_parallel.py).
    model.to(accelerator.device)
    optimizer = accelerator.prepare(optimizer)
    ema = EMA(named, config.ema_decay, config.ema_power, config.ema_inv_gamma) if config.ema_decay > 0 else None
    # fp16 on a GPU scales the loss by a factor that adapts as training goes: part of the state.
    scaler = getattr(accelerator, "scaler", None)
    # The process count is the run's too: each process draws its own rows of every step's batch.
    state = {"config": asdict(config), "num_processes": accelerator.num_processes, **(extra_state or {})}

    # 2. Resume, and drop the logs of steps after the checkpoint (a run that died after saving it).
    if accelerator.is_main_process:
        remove_killed_saves(out)
    # `window` holds the losses of the steps since the last loss.csv row; a checkpoint keeps them,
    # so that the first row after --resume averages the same steps as an uninterrupted run's.
    start, window, last_lr = 0, [], None
    if config.resume:
        saved = load_latest_checkpoint(out / "checkpoints", named, optimizer, ema, scaler, expected=state)
        start, window, last_lr = int(saved["step"]), saved.get("loss_window", []), saved.get("lr")
        check_max_steps(start, config)
        log.info("resumed from step %d", start)
        warn_decay_moved(start, schedule, saved["config"]["max_steps"])
    if config.scale_lr:
        log.info("--scale-lr: learning rate %g x %d images per step = %g", config.learning_rate, per_step,
                 schedule.learning_rate)
    # A finished run's last row, off the --log-every grid, is one an uninterrupted longer run never writes:
    # extended with a higher --max-steps, the run drops it, and its checkpoint kept those steps' window. That
    # window is what tells (a row on the saved run's grid cleared it): --log-every may change on --resume,
    # and read against the new one, a row on the old grid was taken for an extra and dropped.
    last_row_extra = bool(window) and start < config.max_steps
    writer = None
    if accelerator.is_main_process:
        _truncate_loss_log(out / "loss.csv", upto=start - 1 if last_row_extra else start)
        writer = _tensorboard(out / "tensorboard", purge_step=start if last_row_extra else start + 1)
        if last_row_extra and writer is not None:
            _relog_samples(out / "samples", writer, start)
        _remove_later_samples(out / "samples", start)

    # 3. The steps.
    model.train()
    losses = []
    t0 = time.perf_counter()
    step_times, skipped = [], 0
    # The bar is closed on the way out too: a step that raises (a diverged loss, a full disk) leaves its line ended,
    # so that the error line starts a line of its own. TensorBoard's writer is closed on every way out, so that a
    # stopped run's last events reach the disk. A signal is a request to stop until the result is saved.
    with (tqdm(total=config.max_steps, initial=start, desc="train", disable=not accelerator.is_main_process) as progress,
          contextlib.closing(writer) if writer is not None else contextlib.nullcontext(), StopRequests() as stop,
          tf32(config.allow_tf32 and accelerator.device.type == "cuda")):
        if accelerator.is_main_process and start == config.max_steps:
            grid = (lambda: _save_samples(out, writer, start, model, named, ema, sample_fn, sample_nrow)) if sample_fn else None
            # The rate its last step ran at, as the checkpoint saved it: the new --max-steps moved the schedule's end.
            _end_stopped_run(out, writer, start, window, last_lr if last_lr is not None else lr_at(start - 1, schedule), grid)
        for step in range(start, config.max_steps):
            step_start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, schedule)
            micro_losses = []
            for micro in range(config.gradient_accumulation_steps):
                g = step_generator(config.seed, step, micro, accelerator.process_index)
                # Gradients are averaged over the accumulated micro-batches: each loss is divided by their count.
                # Autocast covers the forward pass and the loss only; torch.amp advises against running the
                # backward pass under it (its ops already take the dtypes of their forward ops).
                with _global_rng_from(g, accelerator.device):
                    with accelerator.autocast():
                        loss = loss_fn(micro, g) / config.gradient_accumulation_steps
                    accelerator.backward(loss)  # fp16: scaled by the GradScaler, unscaled before clipping below
                micro_losses.append(loss.detach())
            # One host sync a step, not one a micro-batch: the host queues the next micro-batch while the GPU works.
            total = torch.stack([x.double().reshape(()) for x in micro_losses]).sum()
            if accelerator.num_processes > 1:  # the run's loss, over every process's images, as diffusers logs it
                total = accelerator.reduce(total.to(accelerator.device).reshape(1), reduction="mean")
            total = total.item()
            if accelerator.num_processes > 1:
                average_gradients(named.values(), accelerator)  # in ~25 MB buckets, as DDP does
            grad_norm = None
            if config.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(list(named.values()), config.max_grad_norm)
            if scaler is None:  # fp16's loss scaler skips a step whose gradients overflowed itself (counted below)
                if grad_norm is None:
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in named.values() if p.grad is not None])
                grad_norm = float(grad_norm)
                if not finite_everywhere(accelerator, math.isfinite(total) and math.isfinite(grad_norm)):
                    raise diverged(total, grad_norm, step + 1, config, out)
            elif not finite_everywhere(accelerator, math.isfinite(total)):
                # No loss scale mends a non-finite loss: the scaler would skip every step, the run "finish" untrained.
                raise diverged(total, None, step + 1, config, out)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # fp16: the loss scaler skips a step whose gradients overflowed (and lowers its scale); every step
            # skipped, the run would "finish" untrained without a word.
            skipped += bool(scaler is not None and accelerator.optimizer_step_was_skipped)
            done = step + 1
            if ema is not None:
                ema.update(named, done)
            if accelerator.device.type == "cuda":  # the optimizer's kernels are queued after loss.item()'s sync
                torch.cuda.synchronize(accelerator.device)
            step_times.append(time.perf_counter() - step_start)
            losses.append(total)
            window.append(total)
            progress.update(1)
            progress.set_postfix(loss=f"{total:.4f}")
            if done % config.log_every == 0 or done == config.max_steps:
                mean, lr = sum(window) / len(window), lr_at(step, schedule)
                if done % config.log_every == 0:  # not the last row off the grid: the checkpoint keeps its window
                    window.clear()
                if skipped:
                    log.warning("the fp16 loss scaler skipped %d of the steps up to %d (their gradients overflowed); "
                                "many in a row mean the loss itself overflows fp16: try --mixed-precision bf16 or no", skipped, done)
                    skipped = 0
                if accelerator.is_main_process:
                    _log_row(out, writer, done, mean, lr)
            # Agreed after the update, apart from the finite check before it: a signal during the update, the EMA or the
            # logging still ends the run after this step (one vote before the update would stop it a step late).
            stopping = stop.agreed(accelerator) if done < config.max_steps else 0  # the last step: the run finishes
            if accelerator.is_main_process:
                if done % config.checkpoint_every == 0 or done == config.max_steps or stopping:
                    scaler_state = {"scaler": scaler.state_dict()} if scaler is not None else {}
                    ckpt = save_checkpoint(out / "checkpoints", done, named, optimizer, ema,
                                           {**state, **scaler_state, "loss_window": window, "lr": lr_at(step, schedule)})
                    if config.checkpoints_total_limit is not None:
                        remove_old_checkpoints(out / "checkpoints", ckpt, config.checkpoints_total_limit)
                if sample_fn is not None and ((config.sample_every and done % config.sample_every == 0) or done == config.max_steps):
                    _save_samples(out, writer, done, model, named, ema, sample_fn, sample_nrow)
            if stopping:
                if accelerator.num_processes > 1:  # the others wait for the main one's save: a launcher seeing a
                    accelerator.wait_for_everyone()  # process end with an error status signals the rest at once
                name = signal.Signals(stopping).name
                raise TrainingInterrupted(f"stopped by {name} after step {done} of {config.max_steps}: saved "
                                          f"{out / 'checkpoints' / f'step-{done:07d}'}; --resume continues the run "
                                          f"(with --max-steps {done}, it saves the result as it is now)", stopping, done,
                                          quiet=not accelerator.is_main_process)
        seconds = time.perf_counter() - t0
        if accelerator.is_main_process:
            if ema is not None:
                ema.copy_to(named)  # the exported model is the EMA one
            save_fn(out)
    if stop.signum:  # it came during the last step or the final save: the run is done, and still asked to stop
        raise TrainingInterrupted(f"stopped by {signal.Signals(stop.signum).name} at the end of the run: all "
                                  f"{config.max_steps} steps are done and the result is saved in {out}",
                                  stop.signum, config.max_steps, quiet=not accelerator.is_main_process)
    steps_run = config.max_steps - start
    rate = steps_run * per_step / sum(step_times) if steps_run else 0.0
    return TrainResult(out, config.max_steps, start, losses, seconds, rate, step_times)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """--allow-tf32 for the run: CUDA's fp32 matmuls and convolutions in TF32 (Ampere and later), and the switches
    given back as they were after. They are the process's: left on, a notebook's or a test session's later fp32 work
    ran in TF32 too."""
    if not enabled:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def finite_everywhere(accelerator, finite: bool) -> bool:
    """Whether the step is finite on every process: in a data-parallel run the processes decide together (one
    stopping alone would leave the others waiting in their next collective). Their gradients and losses are averaged
    by then, their gradient norms are their own."""
    if accelerator.num_processes == 1:
        return finite
    return accelerator.reduce(torch.tensor([float(not finite)], device=accelerator.device), reduction="sum").item() == 0


def diverged(loss: float, grad_norm: float | None, step: int, config: TrainConfig, out: Path) -> DiffrtError:
    """The error that stops a run at the first step whose loss or gradient is not finite, on any process, before its
    update: NaN weights would have been checkpointed (their --checkpoints-total-limit pruning the good ones) and saved
    as the result, and every later step is NaN too. A finite loss can have an inf gradient (a sqrt at 0), which
    clipping turns into NaN."""
    kept = list_checkpoints(out / "checkpoints")
    where = f"the newest checkpoint, {kept[-1].name}, is as it was" if kept else "no checkpoint was saved"
    if not math.isfinite(loss):
        what = f"the loss at step {step} is {loss}"
    elif grad_norm is not None and not math.isfinite(grad_norm):
        what = f"the gradient at step {step} is not finite (its norm is {grad_norm}; the loss, {loss:.4g}, is)"
    else:
        what = f"the loss at step {step} is not finite on another process"
    half = " or with --mixed-precision bf16 (fp16's range is 65504)" if config.mixed_precision == "fp16" else ""
    return DiffrtError(f"{what}: training diverged, and the step was not applied; {where}. Start again with a lower "
                       f"--learning-rate (now {config.learning_rate:g}){half} into a new --out (--resume keeps the learning "
                       "rate it saved)")


def _accelerator(mixed_precision: str):
    """accelerate's Accelerator for one run: the device, autocast and (fp16 on a GPU) the GradScaler."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one state per process and refuses an Accelerator whose mixed_precision is not
    # the first one's ("AcceleratorState has already been initialized and cannot be changed"), so a
    # second run in the same process (a notebook, a test session, --resume with another
    # --mixed-precision) would fail. That state is dropped and rebuilt; PartialState, which holds a
    # distributed run's process group, is kept.
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
    if mixed_precision == "fp16" and accelerator.scaler is None:
        log.warning("--mixed-precision fp16 needs a GPU; on %s the run trains in fp32 (bf16 works on the CPU)",
                    accelerator.device)
    return accelerator


def warn_decay_moved(start: int, schedule: TrainConfig, saved_max_steps: int) -> None:
    """A --resume with another --max-steps under a linear or cosine decay: the decay is recomputed to end at the new
    --max-steps (as diffusers' scripts rebuild their scheduler), so the rate moves at once; say by how much. An
    extended finished run restarts from a rate near zero: a warm restart, not what one run to the new end would do."""
    if (schedule.lr_schedule == "constant" or saved_max_steps == schedule.max_steps or start < schedule.lr_warmup_steps
            or start >= schedule.max_steps):  # no step left to run: a stopped run resumed to its own step ends as it is
        return
    before, now = lr_at(start, replace(schedule, max_steps=saved_max_steps)), lr_at(start, schedule)
    if math.isclose(before, now, rel_tol=1e-6, abs_tol=1e-12):
        return
    log.warning("--max-steps %d (the checkpoint's run: %d) moves the end of the %s learning-rate decay: step %d runs at "
                "%.3g where the saved run's schedule gives %.3g; the run is not the one an uninterrupted run to %d would be",
                schedule.max_steps, saved_max_steps, schedule.lr_schedule, start + 1, now, before, schedule.max_steps)


def _remove_later_samples(folder: Path, upto: int) -> None:
    """Remove the sample grids of steps after `upto`: a run killed after its checkpoint left them, and the resumed run
    (which may end earlier, or sample on another grid) would otherwise leave grids of weights it never had."""
    if not folder.is_dir():
        return
    for path in folder.glob("step-*.png"):
        step = path.stem.removeprefix("step-")
        if step.isdigit() and int(step) > upto:
            path.unlink(missing_ok=True)
            log.info("removed %s: a killed run's grid of a step after %d, where this run starts", path, upto)


def _end_stopped_run(out: Path, writer, step: int, window: list[float], lr: float,
                     save_samples: Callable[[], None] | None) -> None:
    """A run stopped by a signal after step N and resumed with --max-steps N ends without a step: write what a run
    that went to N writes at its end, its last loss row (the checkpoint kept the steps since the last one) and its
    sample grid, where the stopped run had not (a finished run resumed has both)."""
    if window and _last_logged_step(out / "loss.csv") != step:
        _log_row(out, writer, step, sum(window) / len(window), lr)
    if save_samples is not None and not (out / "samples" / f"step-{step:07d}.png").exists():
        save_samples()


@torch.no_grad()
def _save_samples(out: Path, writer, step: int, model: nn.Module, named, ema: EMA | None, sample_fn: SampleFn,
                  nrow: int) -> None:
    """The grid of `sample_fn`'s images (with the EMA weights, if any) at `step`: samples/step-NNNNNNN.png, and
    TensorBoard beside the loss curve, as diffusers' scripts log their validation images."""
    from diffrt.images import make_grid, png_bytes

    backup = {k: p.detach().clone() for k, p in named.items()} if ema is not None else None
    if ema is not None:
        ema.copy_to(named)
    model.eval()
    try:
        images = sample_fn()
        # Blow small images (16 px digits) up to about 64 px so the grid is viewable; never shrink.
        grid = make_grid(images.float(), nrow=nrow, scale=max(1, 64 // max(images.shape[-2:])))
        atomic.write_bytes(out / "samples" / f"step-{step:07d}.png", png_bytes(grid))
        if writer is not None:
            writer.add_image("samples", grid.clamp(0, 1), step)
    finally:
        model.train()
        if backup is not None:
            for k, p in named.items():
                p.copy_(backup[k])


def _relog_samples(folder: Path, writer, step: int) -> None:
    """TensorBoard purges every tag from purge_step on: the extra loss row's purge at `step` hid that step's sample
    grid too, whose PNG the run keeps and does not draw again. Log the PNG at its step once more."""
    import numpy as np
    from PIL import Image

    path = folder / f"step-{step:07d}.png"
    if not path.is_file():
        return
    with Image.open(path) as image:  # the run's own grid, written by _save_samples
        grid = np.asarray(image.convert("RGB"))
    writer.add_image("samples", grid, step, dataformats="HWC")


def _tensorboard(folder: Path, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed; logging the loss to loss.csv only (pip install tensorboard)")
        return None
    # purge_step hides the events a dead run logged past its checkpoint (past step 0 for a fresh
    # run: one that died before its first checkpoint), which this run logs again; without it
    # TensorBoard shows those steps twice.
    return SummaryWriter(str(folder), purge_step=purge_step)


def _log_row(out: Path, writer, step: int, loss: float, lr: float) -> None:
    """One row of loss.csv, and the same two values for TensorBoard."""
    path = out / "loss.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        if new:
            w.writerow(["step", "loss", "lr"])
        w.writerow([step, f"{loss:.6f}", f"{lr:.6g}"])
    if writer is not None:
        writer.add_scalar("loss", loss, step)
        writer.add_scalar("lr", lr, step)


def _loss_rows(path: Path) -> list[dict[str, str]]:
    """loss.csv's rows, less what a power cut during an append tore: a last line without its newline (its numbers may
    be cut short, "0.0012" read as "0.00"), and any row whose step, loss and learning rate do not all read as numbers."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")  # not splitlines: it splits at \x0c too
    lines.pop()  # what follows the last newline: "" for a whole file, else the torn row
    return [row for row in csv.DictReader(lines) if _row_complete(row)]


def _row_complete(row: dict[str, str | None]) -> bool:
    try:
        int(row["step"] or ""), float(row["loss"] or ""), float(row["lr"] or "")
    except (KeyError, ValueError):
        return False
    return True


def _last_logged_step(path: Path) -> int | None:
    rows = _loss_rows(path)
    return int(rows[-1]["step"]) if rows else None


def _truncate_loss_log(path: Path, upto: int) -> None:
    """Keep the rows of steps <= upto; later rows (from a run that died after its checkpoint) are dropped."""
    if not path.exists():
        return
    rows = [r for r in _loss_rows(path) if int(r["step"]) <= upto]
    with atomic.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["step", "loss", "lr"])
        for r in rows:
            w.writerow([r["step"], r["loss"], r["lr"]])
