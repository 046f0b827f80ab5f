"""One queue and one worker thread per loaded model: batching, progress, cancel and timeouts.

Generation runs in the worker's thread, never on the event loop; the loop only awaits an
``asyncio.Future`` that the worker resolves through ``call_soon_threadsafe``. Each image is defined by
(prompt, seed, settings) alone: image ``i`` of a request uses seed ``seed + i`` (as in AUTOMATIC1111),
its own start noise and its own planned layout. So requests with the same settings (sampler, steps,
grid, guidance, negative prompt) can run as one batch, and an image comes out the same whether it was
batched or alone (up to float rounding; ``tests/test_serve.py`` checks the bytes), and the same as
``reverie generate --seed S --num-images 1``. Only samplers known to draw no noise after the start
(:data:`DETERMINISTIC_SAMPLERS`, checked by a test) are batched; the others (ddpm, euler_ancestral,
dpmpp_2m_sde, the SDE samplers, and any sampler added later until it is listed) would tie an image to
its batch-mates' draws, so they run one image at a time, each from its own generator. Every image's start
noise carries the Tree-Ring watermark (``reverie.provenance``) unless the server runs with ``--no-watermark``.

Batching is worth it on a CPU: a batch of eight 32x32 images of the shipped model costs little more than one
image (``benchmarks/serve_load.py`` measures it in process, and end to end against ``--no-batching``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..sampling import (
    SamplingOptions,
    available_memory,
    bytes_per_image,
    noise_shape,
    resolve_layouts,
    sample_images,
)
from ..sd import set_image_size

# samplers whose result is a function of the start noise alone (no noise drawn at later steps)
DETERMINISTIC_SAMPLERS = frozenset({"ddim", "euler", "heun", "dpmpp_2m", "unipc"})


class Interrupted(Exception):
    """Raised inside the sampler's callback when every job of the running batch was cancelled."""


class JobError(Exception):
    """A job that could not be done; ``status`` is the HTTP status its request gets."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


@dataclass
class ImageSpec:
    """One image of a job: its prompt, its own seed, and its layout (``auto``, ``none`` or explicit boxes)."""

    prompt: str
    seed: int
    layout: str | list = "auto"


@dataclass(eq=False)
class Job:
    """A request in the queue. ``options`` holds the settings shared by all its images (its seed and layouts
    are per image, in ``images``); ``render`` turns the finished PIL images into the reply (called in the
    worker thread, so that PNG encoding stays off the event loop)."""

    options: SamplingOptions
    images: list[ImageSpec]
    render: Callable[[Job, list], dict]
    timeout: float
    model_name: str = ""
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    state: str = "queued"   # queued -> running -> done | failed | cancelled
    step: int = 0
    steps: int = 0
    preview: torch.Tensor | None = None
    result: dict | None = None
    error: JobError | None = None
    created: float = field(default_factory=time.monotonic)
    finished: float | None = None
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None
    sample_size: tuple[int, int] | None = None  # a Stable Diffusion model's (width, height) for this job
    custom: Callable | None = None  # custom(callback) -> PIL images: a job that runs alone (img2img, inpainting)
    extra: dict = field(default_factory=dict)  # what its PNGs say beyond the sampling options (an edit's mode)

    @property
    def key(self):
        """Jobs with equal keys can share a batch."""
        if self.custom is not None:
            return self.id
        o = self.options
        grid = o.grid if o.grid is None or isinstance(o.grid, str) else tuple(float(v) for v in o.grid)
        return (o.sampler, o.steps, grid, o.guidance_scale, o.guidance_rescale, o.negative_prompt, self.sample_size)

    @property
    def done(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def expired(self, now: float | None = None) -> bool:
        return (now or time.monotonic()) - self.created > self.timeout

    def _resolve(self, state: str, result: dict | None = None, error: JobError | None = None) -> bool:
        """Finish the job once (later calls do nothing) and wake whoever awaits it."""
        if self.done:
            return False
        self.result, self.error, self.state, self.finished = result, error, state, time.monotonic()
        self.preview = None
        if self.future is not None and self.loop is not None:
            def wake(fut=self.future):
                if not fut.done():
                    fut.set_result(self)
            try:
                self.loop.call_soon_threadsafe(wake)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                pass
        return True


class ModelWorker:
    """The queue and the thread of one model. ``max_batch`` bounds the images sampled at once (and is lowered
    to what half the available memory holds); ``batching=False`` runs every job alone (for comparison)."""

    def __init__(self, pipe, max_batch: int = 16, max_queue: int = 64, batching: bool = True, watermark: bool = True):
        self.pipe, self.batching, self.max_queue, self.watermark = pipe, batching, max_queue, watermark
        guided = pipe.conditioning != "none"
        per_image = bytes_per_image(pipe, guided)
        self.max_batch = max(1, min(max_batch, available_memory() // 2 // per_image))
        self.native_side = pipe.image_shape[-1]
        self.queue: list[Job] = []
        self.running: list[Job] = []
        self.last: Job | None = None  # the most recent job to run (what /sdapi/v1/progress reports)
        self.batches = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=f"reverie-worker-{pipe.name}", daemon=True)
        self._thread.start()

    # -- called from the event loop -------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``; a full queue is a 503 (the server is busy, the client may retry)."""
        with self._cond:
            if len(self.queue) >= self.max_queue:
                raise JobError(503, "Busy", f"the queue of model {self.pipe.name!r} is full ({self.max_queue} "
                                            f"requests); try again later")
            job.steps = job.steps or job.options.steps
            self.queue.append(job)
            self._cond.notify()

    def cancel(self, job: Job, reason: str = "cancelled") -> bool:
        """Cancel a queued or running job; a running batch stops at its next step once all its jobs are
        cancelled. Returns False if the job had already finished."""
        with self._cond:
            if job in self.queue:
                self.queue.remove(job)
        kind = "Timeout" if reason == "timeout" else "Cancelled"
        status = 504 if reason == "timeout" else 409
        message = (f"the request took longer than its {job.timeout:g} s timeout" if reason == "timeout"
                   else "the request was cancelled")
        return job._resolve("cancelled", error=JobError(status, kind, message))

    def interrupt(self) -> int:
        """Cancel the jobs now running (``/sdapi/v1/interrupt``); returns how many."""
        return sum(self.cancel(job) for job in list(self.running))

    def close(self) -> None:
        with self._cond:
            self._stop = True
            pending, self.queue = self.queue, []
            self._cond.notify_all()
        for job in pending:
            job._resolve("cancelled", error=JobError(503, "ShuttingDown", "the server is shutting down"))
        self._thread.join(timeout=30)

    # -- the worker thread ----------------------------------------------------------------------------------
    def _next_batch(self) -> list[Job] | None:
        """The oldest live job, and after it (when batching) every queued job with the same settings that fits
        in ``max_batch`` images. Jobs that timed out while queued are dropped here."""
        with self._cond:
            while True:
                now = time.monotonic()
                for job in [j for j in self.queue if j.expired(now)]:
                    self.cancel(job, "timeout")  # the lock is reentrant
                if self._stop:
                    return None
                if self.queue:
                    break
                self._cond.wait(timeout=1.0)
            first = self.queue.pop(0)
            batch, size = [first], len(first.images)
            if self.batching and first.custom is None and first.options.sampler in DETERMINISTIC_SAMPLERS:
                for job in list(self.queue):
                    if job.key == first.key and size + len(job.images) <= self.max_batch:
                        self.queue.remove(job)
                        batch.append(job)
                        size += len(job.images)
            self.running = batch
            for job in batch:
                job.state = "running"
            self.last = first
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._run(batch)
            except Interrupted:
                pass
            except JobError as e:
                for job in batch:
                    job._resolve("failed", error=e)
            except ValueError as e:  # a setting the model cannot take, found while sampling
                for job in batch:
                    job._resolve("failed", error=JobError(422, "InvalidRequest", str(e)))
            except Exception:  # a bug: logged here in full, the client gets one line
                traceback.print_exc(file=sys.stderr)
                for job in batch:
                    job._resolve("failed", error=JobError(500, "InternalError",
                                                          "generation failed; the server log has the details"))
            finally:
                with self._cond:
                    self.running = []
                self.batches += 1

    def _run(self, batch: list[Job]) -> None:
        """Sample every image of ``batch`` in chunks of at most ``max_batch`` and hand each job its images."""
        if batch[0].custom is not None:
            (job,) = batch
            images = job.custom(self._callback([job] * len(job.images)))
            job._resolve("done", result=job.render(job, images))
            return
        units = [(job, k, img) for job in batch for k, img in enumerate(job.images)]
        stochastic = batch[0].options.sampler not in DETERMINISTIC_SAMPLERS
        chunk = 1 if stochastic else self.max_batch
        if batch[0].sample_size is not None:  # memory grows with the area over the size max_batch was set for
            width, height = batch[0].sample_size
            chunk = max(1, int(chunk * self.native_side**2 / (width * height)))
        outputs: dict[Job, list] = {job: [None] * len(job.images) for job in batch}
        for start in range(0, len(units), chunk):
            part = units[start:start + chunk]
            if all(job.done for job, _, _ in part):
                continue
            images = self._sample(part, stochastic)
            for (job, k, _), image in zip(part, images):
                outputs[job][k] = image
            for job in {job for job, _, _ in part}:
                if not job.done and all(o is not None for o in outputs[job]):
                    job._resolve("done", result=job.render(job, outputs[job]))

    def _sample(self, part: list, stochastic: bool) -> list:
        from ..images import to_pil

        job0 = part[0][0]
        if job0.sample_size is not None:  # only this thread samples the model, so setting its size is safe
            set_image_size(self.pipe, *job0.sample_size)
        seeds = [img.seed for _, _, img in part]
        options = dataclasses.replace(job0.options, seed=seeds[0], layouts=self._layouts(part))
        noise = torch.cat([self.noise(seed)[0] for seed in seeds])
        callback = self._callback([job for job, _, _ in part])
        out = sample_images(self.pipe, len(part), options, prompts=[img.prompt for _, _, img in part],
                            callback=callback, noise=noise)
        return to_pil(out)

    def _callback(self, owners: list[Job]):
        """The sampler's per-step callback for a batch whose image ``i`` belongs to ``owners[i]``: progress and
        preview of each job, its timeout, and :class:`Interrupted` once every job of the batch is finished."""
        live_jobs = list(dict.fromkeys(owners))

        def callback(step):
            now = time.monotonic()
            for job in live_jobs:
                if not job.done and job.expired(now):
                    self.cancel(job, "timeout")
            if all(job.done for job in live_jobs):
                raise Interrupted
            for job in live_jobs:
                job.step = step.i + 1
                if self.pipe.vae is None:  # a latent model's estimate would need decoding: no preview
                    job.preview = step.denoised[owners.index(job)].detach().clone()

        return callback

    def noise(self, seed: int) -> tuple[torch.Tensor, dict | str]:
        """Image ``seed``'s unit start noise and its metadata record: the seed's own draw with the Tree-Ring key
        in it (``reverie.provenance.watermark_noise``, as ``reverie generate --seed S --num-images 1`` draws
        it), or the plain draw and "off" without the watermark. The seed still drives a stochastic sampler's
        later noise."""
        from ..provenance import watermark_noise

        noise, record = watermark_noise(self.pipe, 1, seed, enabled=self.watermark)
        if noise is None:
            noise = torch.randn(noise_shape(self.pipe, 1), generator=torch.Generator().manual_seed(seed))
        return noise, record

    def _layouts(self, part: list):
        """Per-image layouts for a layout model: explicit ones as given, planned ones each from its own seed (so
        that an image's boxes do not depend on its batch), "none" as None."""
        if not self.pipe.takes_layouts:
            return "none"
        return [img.layout if isinstance(img.layout, list) else
                resolve_layouts(self.pipe, [img.prompt], img.layout, img.seed)[0] if img.layout == "auto" else None
                for _, _, img in part]
