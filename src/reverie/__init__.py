"""reverie: diffusion models on PyTorch, from a laptop CPU to many GPUs."""

__version__ = "0.1.0"
