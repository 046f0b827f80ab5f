"""One training skeleton for every kind of model, on HF accelerate: :func:`fit` runs a :class:`Trainer`.

The skeleton owns everything a run has whatever it trains: CPU threads, the Accelerator (one process
or many, mixed precision), the output directory, ``config.json``, ``log.jsonl`` (and TensorBoard), the
progress bar, the optimizer and LR schedule, gradient accumulation, clipping, the non-finite-loss guard
(agreed across ranks, so DDP's collectives never hang), a wall-clock limit, crash-safe checkpoints and
exact resume, and a clean stop on Ctrl-C or SIGTERM (:class:`StopRequest`). Its loop, top to bottom (Ho et
al. 2020, Algorithm 1, with what practitioners add)::

    for each step k:  g = generator(seed, rank, k)           # every random draw of the step
                      for each micro-batch: loss = trainer.loss(model, batch, g); backward
                      skip the step everywhere if any rank saw a non-finite loss
                      clip, optimizer step, LR step; trainer.after_step (e.g. EMA)
                      log, trainer.periodic (e.g. sample grids), checkpoint
                      Ctrl-C / SIGTERM seen: checkpoint here and stop (TrainingInterrupted)
    final checkpoint; trainer.finish (write the model directory)

Exact resume: the data order is a pure function of (seed, epoch), every random draw of step k on rank
r comes from a generator seeded by (seed, r, k), and a checkpoint stores weights, optimizer, LR
scheduler, step, data position and the trainer's own state; so N/2 steps + resume + N/2 steps give
the weights of N straight steps. Only the main process writes files.

Adding a trainer (a text model, an audio model) means subclassing :class:`Trainer` and writing:

- ``check()`` (optional): refuse at once what would only fail later;
- ``setup(run)``: check the config against the data, return the dataset (``run.info`` describes it);
- ``build(run, resuming)``: the trainable module (called under ``torch.manual_seed(train.seed)``, so
  every rank starts from the same weights);
- ``loss(model, batch, g)``: the scalar loss of one micro-batch and a dict of floats to log, drawing
  every random number from ``g``;
- ``finish(model, step, run)``: write the model directory (``reverie.modeldir``) and return a result;

and, when needed, ``after_step`` (EMA), ``periodic`` (sample grids), ``state_dict`` /
``load_state_dict`` (extra checkpoint entries) and ``prepared`` (the accelerate-wrapped module). The
config needs the shared sections: ``train`` (a ``RunSection``), ``data`` and ``optim``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..configs import to_dict
from ..modeldir import load_module_weights, module_weights
from ..precision import resolve_precision
from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, newest_first, save_checkpoint
from .data import Batches, DataState, step_generator
from .errors import RunChanged, TrainingError, TrainingInterrupted
from .lock import RunLock


class Trainer:
    """What one kind of model adds to the skeleton (module docstring); ``name`` labels its progress bar.
    ``network_fields``: config paths (dotted prefixes) that define the network; a resume that changes one
    is refused, other changes are allowed and kept in the run's ``history.jsonl``."""

    name = "train"
    network_fields: tuple[str, ...] = ("model.", "data.resolution")

    def __init__(self, cfg, dataset=None):
        self.cfg, self.dataset = cfg, dataset

    def check(self) -> None:
        """Refuse, before any work, what the run would only fail on later (called before the accelerator)."""

    def setup(self, run: Run):
        raise NotImplementedError

    def build(self, run: Run, resuming: bool) -> torch.nn.Module:
        raise NotImplementedError

    def prepared(self, model: torch.nn.Module) -> None:
        """The module as accelerate wrapped it (DDP, autocast), before the first step."""

    def loss(self, model, batch: dict, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def after_step(self, model, step: int, run: Run) -> None:
        """After each optimizer step, on every rank."""

    def periodic(self, step: int, run: Run) -> None:
        """After each step's logging, on every rank (write files on ``run.main`` only)."""

    def state_dict(self) -> dict:
        """Entries the trainer adds to each checkpoint."""
        return {}

    def load_state_dict(self, state: dict, source: Path) -> None:
        """Restore from checkpoint ``source``'s full state (its own entries included)."""

    def finish(self, model, step: int, run: Run):
        raise NotImplementedError


@dataclass
class Progress:
    """Where a run stands; all of it is in every checkpoint."""

    step: int = 0
    data: DataState = field(default_factory=DataState)
    nonfinite_total: int = 0
    elapsed_s: float = 0.0       # training time of earlier invocations (resumed runs)


def _allow_new_precision(precision: str) -> None:
    """accelerate keeps one process-wide state and refuses a second run in another precision (a bf16 run
    after a float32 one in the same notebook or process). In a single, non-distributed process nothing
    else holds that state, so reset it; a launched multi-process run keeps accelerate's check."""
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    state = AcceleratorState._shared_state
    if not state or PartialState._shared_state.get("distributed_type", DistributedType.NO) != DistributedType.NO:
        return
    if state.get("_mixed_precision", precision) != precision:
        AcceleratorState._reset_state(reset_partial_state=True)


class Run:
    """The per-run context a trainer sees: config, accelerator, ranks, output paths and dataset info."""

    def __init__(self, cfg):
        from accelerate import Accelerator  # heavy, and only needed once a run starts

        self.cfg = cfg
        if cfg.train.threads > 0:
            # OpenMP threads spin-wait: on a machine shared with other jobs, more threads than free cores
            # make every op wait for a descheduled thread (measured here: 5x slower with 2 than with 1).
            torch.set_num_threads(cfg.train.threads)
        precision = run_precision(cfg)
        _allow_new_precision(precision)
        self.acc = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
        self.rank, self.world, self.main = self.acc.process_index, self.acc.num_processes, self.acc.is_main_process
        self.out = Path(cfg.train.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.info: dict = {}
        self.t_start = time.perf_counter()
        self.bar = None

    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def global_batch(self) -> int:
        """Images per optimizer step, over all micro-batches and processes."""
        return self.cfg.data.batch_size * self.cfg.train.grad_accum * self.world

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any: decisions that all ranks must take together."""
        return float(self.acc.reduce(torch.tensor([float(flag)], device=self.device), reduction="sum")) > 0

    def say(self, message: str) -> None:
        if self.main:
            (self.bar.write if self.bar is not None else print)(message)


def run_precision(cfg) -> str:
    """accelerate's ``mixed_precision`` for the run: ``train.mixed_precision`` with ``"auto"`` resolved by
    ``reverie.precision`` ("bf16" on CPUs with bf16 matrix units, else "no")."""
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = resolve_precision("auto", "cuda" if torch.cuda.is_available() else "cpu")
    return "no" if precision == "fp32" else precision


def use_channels_last(cfg) -> bool:
    """``train.channels_last``, or when unset (None): whether the run trains in bf16 on the CPU, where
    oneDNN's channels-last bf16 convolutions are the fast path."""
    chosen = getattr(cfg.train, "channels_last", False)
    if chosen is not None:
        return chosen
    return run_precision(cfg) == "bf16" and not torch.cuda.is_available()


def lr_lambda(cfg):
    """The LR multiplier of step k: linear warmup, then constant, cosine or warmup-stable-decay."""
    warm, total, floor = cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if cfg.optim.lr_schedule == "cosine":
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.optim.lr_schedule == "wsd":  # Hu et al. 2024 (MiniCPM); Haegele et al. 2024
            decay = max(1, round(cfg.optim.decay_fraction * total))
            progress = min(1.0, max(0.0, (step - (total - decay)) / decay))
            if cfg.optim.decay_shape == "1-sqrt":
                progress = math.sqrt(progress)
            return 1.0 - (1 - floor) * progress
        return 1.0

    return f


def make_optimizer(cfg, module: torch.nn.Module):
    """AdamW over the trainable parameters, and its LR schedule. The fused (one kernel for all tensors)
    implementation where every parameter is a float32 CPU or CUDA tensor: on the CPU it took the DDPM U-Net's
    optimizer step from 150 to ~40 ms (one core), same update rule."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    o = cfg.optim
    fused = bool(trainable) and all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                            fused=fused or None)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


RUN_STATE = ("step", "model", "optimizer", "lr_scheduler", "data", "config")  # what every run checkpoint holds


def _resume_from(run: Run, resume) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from and its state: ``"auto"`` the run's newest intact one (a damaged newer
    one is skipped, with a warning), a path that checkpoint, False none."""
    if resume != "auto":
        if not resume and list_checkpoints(run.ckpt_dir):
            # pruning keeps the highest steps: a fresh run's checkpoints would be deleted as soon as written
            raise RunChanged(f"{run.out} holds checkpoints of an earlier run; resume it (--resume auto), or move "
                             f"{run.ckpt_dir} away, or train into another train.out_dir")
        return (Path(resume), load_checkpoint(resume, RUN_STATE)) if resume else (None, None)
    damaged = []
    for candidate in newest_first(run.ckpt_dir):
        try:
            state = load_checkpoint(candidate, RUN_STATE)
        except (ValueError, OSError) as e:
            damaged.append(f"{candidate.name} ({e})")
            continue
        if damaged:
            run.say(f"reverie: warning: skipped damaged checkpoint(s) {'; '.join(damaged)}; resuming from "
                    f"{candidate.name}")
        return candidate, state
    if damaged:
        raise TrainingError(f"every checkpoint of {run.out} is damaged: {'; '.join(damaged)}; move "
                            f"{run.ckpt_dir} away to start afresh")
    pointer = run.ckpt_dir / "latest"
    if pointer.is_file():  # checkpoints were deleted or never copied: starting over would hide the loss
        raise TrainingError(f"{pointer} names {pointer.read_text().strip()!r}, which is not there, and no other "
                            f"checkpoint is; restore it, or move {run.ckpt_dir} away to start afresh")
    return None, None


ABSENT = "(absent)"


def _flat(tree: dict, prefix: str = "", containers: set | None = None) -> dict:
    """Dotted path -> leaf value; ``containers`` collects the paths of dict-valued fields inside the sections
    (``model.network_overrides``: the user's keys, not a config schema's)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            if containers is not None and prefix:
                containers.add(f"{prefix}{key}")
            out.update(_flat(value, f"{prefix}{key}.", containers))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _changes(old_cfg: dict, new_cfg: dict) -> dict:
    """path -> (old, new) for every leaf that differs; a key inside a dict present in both configs (e.g. a
    network override) that one side lacks counts as changed. A section field the other version of reverie did
    not have is not a change."""
    old_dicts, new_dicts = set(), set()
    old, new = _flat(old_cfg, containers=old_dicts), _flat(new_cfg, containers=new_dicts)
    both = old_dicts & new_dicts
    changed = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, ABSENT), new.get(key, ABSENT)
        if a != b and (key in old and key in new or key.rsplit(".", 1)[0] in both):
            changed[key] = (a, b)
    return changed


def _check_changes(trainer: Trainer, run: Run, state: dict, source: Path) -> None:
    """Refuse a resume that changes the network; record any other change in ``history.jsonl``."""
    changed = _changes(state["config"], to_dict(run.cfg))
    network = [k for k in changed if k.startswith(trainer.network_fields)]
    if network:
        shown = ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in network[:4])
        raise RunChanged(f"{source} was trained with another network ({shown}); resume with its settings, "
                         f"or start a new train.out_dir (--train.init_from=MODEL_DIR fine-tunes from a model)")
    if changed and run.main:
        run.say("resuming with changed settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        with (run.out / "history.jsonl").open("a") as f:
            f.write(json.dumps({"step": state["step"], "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                "changed": {k: list(v) for k, v in changed.items()}}) + "\n")


def _restore(state: dict, source: Path, module, opt, sched, trainer: Trainer, run: Run) -> Progress:
    trainer.load_state_dict(state, source)
    load_module_weights(module, state["model"], source=str(source))
    opt.load_state_dict(state["optimizer"])
    _match_layouts(opt)
    sched.load_state_dict(state["lr_scheduler"])
    run.say(f"resumed from {source} at step {state['step']}")
    return Progress(state["step"], DataState(**state["data"]), state.get("nonfinite_total", 0),
                    state.get("elapsed_s", 0.0))


def _match_layouts(opt) -> None:
    """Give each restored optimizer state tensor its parameter's memory layout. Checkpoints store contiguous
    tensors; a channels_last parameter beside a contiguous moment would make the fused AdamW kernel, which
    walks all of a parameter's tensors in memory order, pair the wrong elements."""
    for group in opt.param_groups:
        for param in group["params"]:
            for key, value in opt.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    opt.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _checkpoint(run: Run, trainer: Trainer, model, opt, sched, progress: Progress) -> Path | None:
    if not run.main:
        return None
    state = {"step": progress.step, "model": module_weights(run.acc.unwrap_model(model)),
             "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(), "data": vars(progress.data).copy(),
             "nonfinite_total": progress.nonfinite_total, "elapsed_s": _elapsed(run, progress),
             "config": to_dict(run.cfg), "info": dict(run.info), **trainer.state_dict()}
    return save_checkpoint(run.ckpt_dir, progress.step, state, keep_last=run.cfg.train.keep_last)


def _elapsed(run: Run, progress: Progress) -> float:
    return progress.elapsed_s + time.perf_counter() - run.t_start


def _micro_steps(trainer: Trainer, model, batches: Batches, g: torch.Generator, run: Run):
    """Forward and backward over the step's micro-batches: (mean loss, mean metrics, non-finite seen)."""
    accum = run.cfg.train.grad_accum
    total, metrics = 0.0, {}
    for micro in range(accum):
        batch = batches.next()
        with run.acc.autocast():
            loss, logged = trainer.loss(model, batch, g)
        # every rank decides together, before backward: a rank that skipped DDP's gradient all-reduce alone would
        # leave the others waiting in it; all ranks stop at the same micro-batch, so data positions stay aligned
        if run.any_rank(not bool(torch.isfinite(loss))):
            return total, metrics, True
        total += float(loss.detach()) / accum
        for key, value in logged.items():
            metrics[key] = metrics.get(key, 0.0) + value / accum
        last = micro == accum - 1
        with run.acc.no_sync(model) if (not last and run.world > 1) else nullcontext():
            run.acc.backward(loss / accum)
    return total, metrics, False


class _Log:
    """``log.jsonl`` (plus TensorBoard when asked) on the main process; images/s between records."""

    def __init__(self, run: Run, resumed_at: int | None):
        self.run, self.file, self.tb = run, None, None
        self.t_last, self.images = time.perf_counter(), 0
        if run.main:
            path = run.out / "log.jsonl"
            if resumed_at is not None:
                _truncate_log(path, resumed_at)
            self.file = path.open("a" if resumed_at is not None else "w")
            self.tb = _tensorboard(run.out) if run.cfg.train.tensorboard else None

    def write(self, record: dict, now: float) -> None:
        record["images_per_s"] = self.images / max(now - self.t_last, 1e-9)
        self.t_last, self.images = now, 0
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, float):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        for f in (self.file, self.tb):
            if f is not None:
                f.close()


def _truncate_log(path: Path, step: int) -> None:
    """Keep the records up to the checkpoint's ``step`` (the later ones will be written again) and drop a line
    a kill cut in half; atomically, so a crash here loses nothing."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _tensorboard(out: Path):
    """A TensorBoard writer if the tensorboard package is installed (else a warning and None)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("train.tensorboard=true but tensorboard is not installed (pip install tensorboard); "
                      "logging to log.jsonl only", stacklevel=2)
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _skip_step(run: Run, opt, sched, progress: Progress, bad_in_a_row: int, last_good) -> None:
    """A non-finite loss on any rank: no update anywhere; stop after ``max_nonfinite`` in a row."""
    opt.zero_grad(set_to_none=True)
    progress.nonfinite_total += 1
    if bad_in_a_row >= run.cfg.train.max_nonfinite:
        raise TrainingError(
            f"{bad_in_a_row} non-finite losses in a row at step {progress.step}: the learning rate "
            f"({run.cfg.optim.lr:g}) is likely too high, or fp16 overflowed (try bf16 or no), or "
            f"the data contain NaN. Last good checkpoint: {last_good or 'none'}")
    progress.step += 1  # a skipped step still advances, keeping the (seed, rank, step) stream aligned
    with warnings.catch_warnings():  # stepping the LR without an optimizer step is intended
        warnings.simplefilter("ignore", UserWarning)
        sched.step()


def fit(trainer: Trainer, resume: str | bool = "auto"):
    """Run ``trainer`` to ``train.steps``; ``resume="auto"`` continues from the run's newest intact checkpoint
    if any, a path resumes from that checkpoint, False starts fresh. The main process holds the run
    directory's lock (``reverie.train.lock``) throughout. Returns ``trainer.finish``'s result."""
    trainer.check()
    run = Run(trainer.cfg)
    with RunLock(run.out) if run.main else nullcontext():
        return _fit(trainer, run, resume)


class StopRequest:
    """While a run trains, SIGINT (Ctrl-C) and SIGTERM (``kill``, a scheduler's preemption) ask it to stop: the
    step under way completes, a checkpoint is written there and :class:`TrainingInterrupted` is raised, so the
    same command resumes with nothing lost (before this, everything since the last periodic checkpoint was).
    A second signal stops at once (``KeyboardInterrupt``). Handlers can be set only in the main thread;
    elsewhere (a run started from a worker thread) signals keep their usual effect. The previous handlers
    come back when the run ends."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    __enter__ = install

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Give the signals back their previous handlers (the loop is over: a Ctrl-C now aborts at once)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None


def _fit(trainer: Trainer, run: Run, resume):
    cfg = run.cfg
    dataset = trainer.setup(run)
    source, state = _resume_from(run, resume)
    if state is not None:
        _check_changes(trainer, run, state, source)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    module = trainer.build(run, resuming=state is not None)
    opt, sched = make_optimizer(cfg, module)
    progress = _restore(state, source, module, opt, sched, trainer, run) if state is not None else Progress()
    model, opt = run.acc.prepare(module, opt)
    trainer.prepared(model)
    batches = Batches(dataset, cfg, run.rank, run.world, progress.data)
    if run.main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    log = _Log(run, resumed_at=progress.step if state is not None else None)
    show = run.main and cfg.train.progress and sys.stderr.isatty()
    run.bar = tqdm(total=cfg.train.steps, initial=progress.step, disable=not show, desc=trainer.name,
                   dynamic_ncols=True)
    bad_in_a_row, last_good = 0, latest_checkpoint(run.ckpt_dir)
    model.train()
    stop = StopRequest().install()  # from the first step on: a Ctrl-C while the run sets up stops it at once
    try:
        while progress.step < cfg.train.steps:
            g = step_generator(cfg.train.seed, run.rank, progress.step)
            torch.manual_seed(g.initial_seed() % 2**63)  # the network's dropout
            opt.zero_grad(set_to_none=True)
            loss, metrics, bad = _micro_steps(trainer, model, batches, g, run)
            if bad:  # already agreed by every rank
                bad_in_a_row += 1
                _skip_step(run, opt, sched, progress, bad_in_a_row, last_good)
                continue
            bad_in_a_row = 0
            grad_norm = run.acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip) \
                if cfg.optim.grad_clip > 0 else None
            opt.step()
            sched.step()
            progress.step += 1
            step = progress.step
            trainer.after_step(model, step, run)
            log.images += run.global_batch
            run.bar.update(1)
            # every rank must stop at the same step: the main process's clock decides
            out_of_time = cfg.train.time_limit_min > 0 and run.any_rank(
                run.main and time.perf_counter() - run.t_start > 60 * cfg.train.time_limit_min)
            interrupted = run.any_rank(stop.requested) if run.world > 1 else stop.requested
            if run.main and (step % cfg.train.log_every == 0 or step == cfg.train.steps or out_of_time
                             or interrupted):
                record = {"step": step, "loss": loss, **metrics, "lr": sched.get_last_lr()[0],
                          "grad_norm": float(grad_norm) if grad_norm is not None else None,
                          "nonfinite_skipped": progress.nonfinite_total, "epoch": progress.data.epoch,
                          "elapsed_s": _elapsed(run, progress)}
                log.write(record, time.perf_counter())
                run.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{record['images_per_s']:.1f}")
            if not interrupted:
                trainer.periodic(step, run)
            if interrupted or cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                last_good = _checkpoint(run, trainer, model, opt, sched, progress) or last_good
                run.acc.wait_for_everyone()
            if interrupted:
                name = signal.Signals(stop.signum).name if stop.signum is not None else "a signal on another rank"
                written = run.ckpt_dir / f"ckpt-{step:08d}"  # by the main process (every rank names it)
                raise TrainingInterrupted(
                    f"stopped by {name} after step {step} of {cfg.train.steps}; checkpoint {written} written. "
                    f"The same command resumes the run",
                    step, written, stop.signum or signal.SIGINT)
            if out_of_time:
                run.say(f"time limit of {cfg.train.time_limit_min:g} min reached at step {step}")
                break
    finally:
        stop.release()
        run.bar.close()
        log.close()
    newest = latest_checkpoint(run.ckpt_dir)
    if newest is None or newest.name != f"ckpt-{progress.step:08d}":  # e.g. a last step skipped as non-finite
        _checkpoint(run, trainer, model, opt, sched, progress)
    result = trainer.finish(model, progress.step, run)
    run.acc.wait_for_everyone()
    return result
