"""A tiny deterministic dataset for trainer tests (importable by subprocesses too)."""

import os

import torch


class Toy(torch.utils.data.Dataset):
    num_classes = 3

    def __init__(self, size=64, log=None, nan=False):
        self.size, self.log, self.nan = size, log, nan

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        if self.log:  # record which indices this rank read
            with open(f"{self.log}.{os.environ.get('RANK', '0')}", "a") as f:
                f.write(f"{i}\n")
        g = torch.Generator().manual_seed(i)
        img = torch.rand(3, 16, 16, generator=g) * 2 - 1
        return {"image": img * float("nan") if self.nan else img, "label": i % 3, "text": "toy"}
