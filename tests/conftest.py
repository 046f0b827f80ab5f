"""Test-wide settings: one intra-op thread per test process (the suite runs 2 workers on 2 cores;
more threads only contend, and diffusers' scheduler construction is 200x slower with 2)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the subprocesses some tests start

import torch  # noqa: E402

torch.set_num_threads(1)
