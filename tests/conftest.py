"""Test-wide settings and shared fixtures.

One intra-op thread per test process (the suite runs 2 workers on 2 cores; more threads only contend, and
diffusers' scheduler construction is 200x slower with 2). ``make_model_dir`` writes tiny random model
directories (see ``helpers.py`` for the overrides they are usually built from).
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the subprocesses some tests start
# precision "auto" means float32 in tests (closed forms, diffusers at float32 tolerances); the bf16 default of
# CPUs with AMX is tested where asked for explicitly (reverie.precision)
os.environ.setdefault("REVERIE_PRECISION", "fp32")
# signing certificates and the watermark key are made on first use: in a fresh folder, not the user's
os.environ.setdefault("REVERIE_HOME", tempfile.mkdtemp(prefix="reverie-home-"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def make_model_dir(tmp_path_factory):
    """A factory ``(name, overrides, info, perturb=0.05, seed=0) -> Path``: a diffusion model directory named
    ``name`` (in a fresh temporary folder) holding the network of ``load_config(TrainConfig, None, overrides)``
    for data described by ``info``, built after ``torch.manual_seed(seed)`` with its weights perturbed by
    ``perturb`` (see ``helpers.tiny_network``; 0 keeps the initialization)."""
    from helpers import tiny_config, tiny_network
    from reverie.build import save_diffusion

    def make(name: str, overrides, info: dict, perturb: float = 0.05, seed: int = 0):
        cfg = tiny_config(*overrides)
        net = tiny_network(cfg, info, seed=seed, perturb=perturb)
        return save_diffusion(tmp_path_factory.mktemp("model") / name, cfg, info, net)

    return make
