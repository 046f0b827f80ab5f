"""reverie: diffusion models on PyTorch, from a laptop CPU to many GPUs.

How the code is laid out. Five layers; a module imports only from its own layer or below
(``tests/test_layers.py`` parses every import, those inside functions too, and fails on a cycle)::

    5 surfaces   pipeline.py (Pipeline)   eval/ (fid, adherence, probe, evaluate)   cli/ (reverie ...)
    4 use        sampling.py (SamplingOptions, sample_images, tune_grid)   train/ (run skeleton + trainers)
    3 model io   modeldir.py (the on-disk format, every kind)   build.py (config -> schedule, network, ...)
    2 data       data/ (shapes/, mnist, digits, imagefolder)   latent.py   layout.py   conditioning.py
    1 core       schedules  process  denoisers  losses  guidance  likelihood*  gmm  samplers/  nets/  text/

Which module to open for what:

- the math: ``schedules.py`` (noise schedules), ``process.py`` (forward process), ``denoisers.py`` (eps / x0 /
  v / EDM parameterizations as one ``D(x, sigma)``), ``losses.py``, ``guidance.py`` (CFG), ``likelihood*.py``;
- sampling: ``samplers/`` (one file per family, pure functions over a sigma grid; ``grids.py``, ``tuning.py``),
  and ``sampling.py`` for a whole model (conditioning, guidance, noise, decoding);
- networks: ``nets/`` (``layers.py`` shared blocks, ``unet.py``, ``dit.py``, ``autoencoder.py``), text encoders
  in ``text/``;
- files: ``modeldir.py`` (read / write model directories), ``train/checkpoint.py`` (crash-safe checkpoints);
- training: ``train/run.py`` (the skeleton: accelerator, resume, logging, non-finite guard), then one trainer
  per kind (``train/diffusion.py``, ``train/vae.py``); configs in ``train/config.py``;
- the command line: ``cli/`` (``common.py`` holds the shared sampling options).

Adding a new kind of model:

- a network: a module in ``nets/`` with a config dataclass and ``forward(x, c_noise, **cond)``, zero-initialized
  output, registered in ``nets.PRESETS``;
- a sampler: a function in a ``samplers/`` family module, decorated with ``@register("name")``, taking
  ``(denoiser, x, sigmas, *, generator, callback, cond, **opts)``; it is then in ``SAMPLERS``, the CLI and tests;
- a process that is not one scalar Gaussian: its own layer-1 module and sampler family;
- a trainer: a ``Trainer`` subclass on ``train/run.py`` (its docstring lists the five methods), a config with the
  shared ``RunSection``, ``DataSection`` and ``OptimSection``, and a model kind in ``modeldir.KINDS``.
"""

__version__ = "0.1.0"
