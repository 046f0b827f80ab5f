"""Training data for every trainer: per-rank shards, resumable positions, per-step generators.

Exact resume rests on three pure functions: the data order of an epoch is a function of ``(seed,
epoch)`` (:class:`ShardedSampler`), a run's position is ``(epoch, batch)`` (:class:`DataState`), and every
random draw of step ``k`` on rank ``r`` comes from :func:`step_generator` ``(seed, r, k)``. Data are
sharded by the loop itself (rank r takes every world-th index of the epoch's order), so no sample is
seen twice in an epoch across ranks.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler

from .errors import TrainingError


class ShardedSampler(Sampler):
    """Indices of one rank for one epoch, starting at a given batch; a pure function of its args.

    Datasets larger than 2**24 (procedural ones) are read in order: each index is already a fresh
    random sample, and a permutation of them would not fit in memory.
    """

    def __init__(self, size: int, rank: int, world: int, seed: int, epoch: int, shuffle: bool,
                 start: int = 0):
        self.size, self.rank, self.world = size, rank, world
        self.seed, self.epoch, self.shuffle, self.start = seed, epoch, shuffle, start

    def __len__(self) -> int:
        return max(0, (self.size - self.rank + self.world - 1) // self.world - self.start)

    def __iter__(self):
        first = self.rank + self.start * self.world
        if self.shuffle and self.size <= 2**24:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            return iter(torch.randperm(self.size, generator=g)[first::self.world].tolist())
        return iter(range(first, self.size, self.world))


def collate(items: list[dict]) -> dict:
    """Stack images (or cached latent moments) and labels; keep captions as a list of strings."""
    batch = {
        "label": torch.tensor([int(it.get("label", -1)) for it in items]),
        "text": [it.get("text", "") for it in items],
    }
    # moments: cached VAE posteriors; tokens: text windows; object_masks: per-object coverage (inpainting)
    for key in ("image", "moments", "tokens", "object_masks"):
        if key in items[0]:
            batch[key] = torch.stack([it[key] for it in items])
    if "layout" in items[0]:  # per-image lists of (phrase, box): reverie.layout
        batch["layout"] = [it["layout"] for it in items]
    return batch


@dataclass
class DataState:
    epoch: int = 0
    batch: int = 0  # batches consumed in this epoch (per rank)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + rank) * 10_000_019 + step)


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the training process: a terminal sends it to the whole process
    group, and a worker that died of it would break the step that the run finishes before it stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Batches:
    """Endless per-rank batches with a resumable position (epoch, batch)."""

    def __init__(self, dataset, cfg, rank: int, world: int, state: DataState):
        self.dataset, self.cfg, self.rank, self.world, self.state = dataset, cfg, rank, world, state
        self._it = None

    def _loader(self):
        cfg, state = self.cfg, self.state
        if hasattr(self.dataset, "set_epoch"):  # e.g. imagefolder's per-epoch random flips
            self.dataset.set_epoch(state.epoch)
        sampler = ShardedSampler(len(self.dataset), self.rank, self.world, cfg.train.seed,
                                 state.epoch, cfg.data.shuffle, state.batch * cfg.data.batch_size)
        # its own generator: starting an iterator draws a base seed (for workers), which from the global
        # generator would shift the network's dropout draws in the step where a resumed run starts its loader
        own = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + state.epoch)
        return DataLoader(self.dataset, batch_size=self.cfg.data.batch_size, sampler=sampler,
                          num_workers=self.cfg.data.num_workers, collate_fn=collate, drop_last=True,
                          persistent_workers=False, generator=own,
                          worker_init_fn=_ignore_sigint if self.cfg.data.num_workers else None)

    def next(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self._loader())
            try:
                batch = next(self._it)
                self.state.batch += 1
                return batch
            except StopIteration:
                self._it = None
                self.state.epoch += 1
                self.state.batch = 0
        raise TrainingError(f"dataset {self.cfg.data.name!r} is smaller than one batch per process")
