"""Run by tests/test_train.py under `torchrun --standalone --nproc_per_node 2` (gloo on CPU): two processes draw
different data (the step generator is seeded by the process index); after training, every rank
must hold the same weights, which only holds if the loop averages their gradients.

With a second argument `buckets`, the ranks first average gradients of several dtypes and sizes with a tiny
bucket cap (check_buckets), then train as without it. With `diverge`, rank 1's loss turns NaN at step 3: both ranks must stop there with the loop's
one-line error (printed as DIVERGED=...), neither left waiting for the other. With `stop-rank1` (`stop-all`),
rank 1 alone (every rank) gets SIGTERM during step 3: both must stop after it (printed as STOPPED=...) and end
as the CLI does, by the signal, once the main rank has saved the checkpoint (slowed down here by 2 s). With
`stop-rank1-in-update`, rank 1 gets it during step 3's optimizer update, after its loss and gradients: the same.

The run goes through checkpoints.holds_out, as the trainers' runs do: one process (the main one) locks --out;
were each to lock it, the second would be refused as another run into the same --out."""

import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
from accelerate import PartialState

from diffrt.errors import DiffrtError, TrainingInterrupted
from diffrt.train.checkpoints import holds_out
from diffrt.train.config import TrainConfig
from diffrt.train.loop import train

torch.manual_seed(0)
model = torch.nn.Linear(8, 1)
state = PartialState(cpu=True)


def check_buckets() -> None:
    """`buckets`: every gradient averaged over the ranks whichever bucket it fell in (dtypes change and a
    tensor exceeds the cap here), in place, and a parameter without a gradient left without one."""
    from accelerate import Accelerator

    from diffrt.train.data_parallel import average_gradients

    shapes = [((3, 4), torch.float32), ((5,), torch.float32), ((2,), torch.float64), ((7, 2), torch.float32),
              ((1,), torch.float32), ((4,), torch.float32)]
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape, dtype in shapes]
    for i, p in enumerate(params[:-1]):  # the last one keeps grad None
        p.grad = torch.arange(p.numel(), dtype=p.dtype).view_as(p) * (state.process_index + 1) + i
    before = [p.grad for p in params[:-1]]
    average_gradients(params, Accelerator(cpu=True), bucket_bytes=40)  # 10 float32s: several buckets
    mean_factor = sum(range(1, state.num_processes + 1)) / state.num_processes
    error = max((p.grad - (torch.arange(p.numel(), dtype=p.dtype).view_as(p) * mean_factor + i)).abs().max().item()
                for i, p in enumerate(params[:-1]))
    same = all(p.grad is g for p, g in zip(params, before))
    print(f"BUCKETS=error {error:.3e} in_place {same} none_kept {params[-1].grad is None}", flush=True)


if sys.argv[2:] == ["buckets"]:
    check_buckets()
diverge = sys.argv[2:] == ["diverge"]
stop = sys.argv[2] if sys.argv[2:] and sys.argv[2].startswith("stop-") else None
calls, own = [], []  # own: this rank's losses, one a step (no accumulation here)


def loss_fn(micro: int, g: torch.Generator) -> torch.Tensor:
    calls.append(micro)
    if len(calls) == 3 and (stop == "stop-all" or stop == "stop-rank1" and state.process_index == 1):
        os.kill(os.getpid(), signal.SIGTERM)
    x = torch.randn(16, 8, generator=g)
    y = x.sum(dim=1, keepdim=True) * (1 + state.process_index)  # the ranks disagree on purpose
    loss = torch.nn.functional.mse_loss(model(x), y)
    own.append(loss.item())
    return loss * float("nan") if diverge and state.process_index == 1 and len(calls) == 3 else loss


if stop == "stop-rank1-in-update":
    adamw_step, updates = torch.optim.AdamW.step, []

    def signalled_step(self, *args, **kwargs):
        updates.append(1)
        if len(updates) == 3 and state.process_index == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return adamw_step(self, *args, **kwargs)

    torch.optim.AdamW.step = signalled_step

if stop:
    import diffrt.train.loop as loop

    def slow_save(*args, **kwargs):
        time.sleep(2)
        return save_checkpoint(*args, **kwargs)

    save_checkpoint = loop.save_checkpoint
    loop.save_checkpoint = slow_save


@dataclass
class Run:
    """The least a trainer's config holds."""

    train: TrainConfig

    def validate(self) -> None:
        self.train.validate()


try:
    result = holds_out(lambda run: train(run.train, model, loss_fn, save_fn=lambda out: None))(
        Run(TrainConfig(out=sys.argv[1], max_steps=5, batch_size=16, learning_rate=0.1, lr_warmup_steps=1,
                        checkpoint_every=100)))
    # The run's throughput counts both processes' images: 2 x 16 per step.
    print(f"IMAGES_PER_STEP={result.samples_per_second * sum(result.step_seconds) / len(result.step_seconds):.3f}")
    # The loss logged (loss.csv, TensorBoard, the result) is the run's: the mean of the ranks' own, on every rank.
    mine = torch.tensor(own, dtype=torch.float64)
    ranks = [torch.zeros_like(mine) for _ in range(state.num_processes)]
    torch.distributed.all_gather(ranks, mine)
    error = (torch.tensor(result.losses, dtype=torch.float64) - torch.stack(ranks).mean(dim=0)).abs().max().item()
    print(f"LOGGED_IS_THE_RANKS_MEAN={error < 1e-12} ranks_differ={bool((ranks[0] - ranks[1]).abs().max() > 1e-3)}")
except DiffrtError as exc:
    print(f"DIVERGED={exc}")
except TrainingInterrupted as exc:
    print(f"STOPPED={'(quiet) ' if exc.quiet else ''}{exc}", flush=True)
    signal.signal(exc.signum, signal.SIG_DFL)
    os.kill(os.getpid(), exc.signum)
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(state.num_processes)]
torch.distributed.all_gather(gathered, flat)
if state.is_main_process:
    spread = max((g - gathered[0]).abs().max().item() for g in gathered)
    print(f"RANK_SPREAD={spread:.3e}")
# Tear the process group down before exit: left to the interpreter's shutdown, gloo's threads can be
# destroyed while a rank still runs ("terminate called without an active exception", SIGABRT).
torch.distributed.barrier()
torch.distributed.destroy_process_group()
# Even so, under load a rank still aborted in the interpreter's teardown of the C++ side (seen twice in CI on a
# busy 2-core machine): everything this script owes is printed, so leave without running those destructors.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
