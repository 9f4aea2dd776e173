"""Averaging gradients over the processes of a data-parallel run, in buckets.

The loop places the model rather than wrapping it in DistributedDataParallel (trainers call their own
modules, a UNet or a peft adapter inside a pipeline, which the wrapper would bypass), so it averages
the gradients itself once the accumulated backward passes are done. One all-reduce per parameter
tensor would pay a collective's fixed latency ~700 times a step for a Stable Diffusion UNet (and NCCL
runs small messages far below its bandwidth); DDP instead packs gradients into ~25 MB buckets, and so
does this: the gradients of one dtype and device are flattened into a bucket, the bucket is reduced,
and its slices are copied back in place.

Every process must hold gradients for the same parameters, in the same order: the buckets are built
from each process's own list, and a collective over buckets that differ would mix unrelated numbers
(or wait forever). A parameter the forward pass skips on one process only is the same error under DDP
("find_unused_parameters"); the trainers here use every trainable parameter at every step.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

BUCKET_BYTES = 25 * 2**20  # DistributedDataParallel's default bucket_cap_mb


def buckets(grads: list[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> Iterator[list[torch.Tensor]]:
    """`grads` in order, grouped into runs of one dtype and device of at most `bucket_bytes` each (a
    tensor larger than that is a bucket of its own)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if bucket and (g.dtype != bucket[0].dtype or g.device != bucket[0].device or size + nbytes > bucket_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += nbytes
    if bucket:
        yield bucket


@torch.no_grad()
def average_gradients(params: Iterable[torch.nn.Parameter], accelerator, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Replace each parameter's gradient by its mean over the run's processes, one collective per bucket."""
    grads = [p.grad for p in params if p.grad is not None]
    for bucket in buckets(grads, bucket_bytes):
        flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in bucket]), reduction="mean")
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
