"""Training batches made in worker processes, so that a GPU is not left waiting on the CPU-side degradations.

A sample is a pure function of (seed, global sample number) (see trainer.make_batch), so a batch is the same
whether it is made on the main process or by any number of workers; only the wall time changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

Batch = tuple[torch.Tensor, torch.Tensor, dict]


class Samples(Dataset):
    """Global sample number k -> make(first_sample=k, n=1, device="cpu")."""

    def __init__(self, make: Callable[..., Batch]):
        self.make = make

    def __getitem__(self, k: int) -> Batch:
        return self.make(first_sample=k, n=1, device="cpu")


class MicroBatches(Sampler):
    """This process's micro-batches from number `first_micro` on, forever: the samples the trainer would ask for."""

    def __init__(self, batch_size: int, first_micro: int, num_processes: int = 1, rank: int = 0):
        self.batch_size, self.first_micro, self.num_processes, self.rank = batch_size, first_micro, num_processes, rank

    def __iter__(self):
        m = self.first_micro
        while True:
            first = (m * self.num_processes + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))
            m += 1


def collate(items: list[Batch]) -> Batch:
    hq, lq, draws = zip(*items)
    return torch.cat(hq), torch.cat(lq), {k: torch.cat([d[k] for d in draws]) for k in draws[0]}


def _one_thread(_):
    torch.set_num_threads(1)  # many workers, each with its own sample: no thread pool fights another


def batch_stream(
    make: Callable[..., Batch],
    batch_size: int,
    first_micro: int,
    num_processes: int = 1,
    rank: int = 0,
    workers: int = 0,
    device="cpu",
    prefetch: int = 4,
) -> Iterator[Batch]:
    """The trainer's micro-batches in order, on `device`. `make(first_sample=, n=, device=)` builds n samples;
    with workers > 0 they come from a DataLoader that runs `prefetch` batches per worker ahead."""
    if workers <= 0:
        m = first_micro
        while True:
            yield make(first_sample=(m * num_processes + rank) * batch_size, n=batch_size, device=device)
            m += 1
    cuda = torch.device(device).type == "cuda"
    loader = DataLoader(
        Samples(make),
        batch_sampler=MicroBatches(batch_size, first_micro, num_processes, rank),
        num_workers=workers,
        collate_fn=collate,
        pin_memory=cuda,
        prefetch_factor=prefetch,
        worker_init_fn=_one_thread,
        persistent_workers=True,
    )
    for hq, lq, draws in loader:
        yield (
            hq.to(device, non_blocking=cuda),
            lq.to(device, non_blocking=cuda),
            {k: v.to(device, non_blocking=cuda) for k, v in draws.items()},
        )
