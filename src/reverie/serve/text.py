"""Text generation for ``reverie serve``: ``POST /v1/text`` on a masked diffusion text model (``reverie.language``).

Each text model has its own queue and worker thread (:class:`TextWorker`, the image worker's queue, cancel and
timeouts), so sampling never runs on the event loop. Only the model's config.json is read when the server
starts; its weights (and its AR energy model, for the edlm sampler or corrector sweeps) load on the first
request, in the worker thread, so a text model adds nothing noticeable to start-up. A reply is
``reverie.language.generate_text``'s text for the same settings and seed, the text ``reverie generate-text`` prints.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from pathlib import Path

from .worker import ImageSpec, Interrupted, Job, JobError, ModelWorker

_SPAN = re.compile(r"\[MASK(?:\*(\d+))?\]")  # as reverie.language reads them


class TextModel:
    """A text model directory: its config now, its network (and energy model) on first use."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        from ..discrete.sampling import CORRECTOR_BLOCK, EDLM_WINDOW
        from ..language import resolve_text_model
        from ..modeldir import parsing, read
        from ..text.chars import CharTokenizer

        self.path, self.device = resolve_text_model(path), device
        found = read(self.path, kind="text")
        self.config = found.config
        if self.config.get("objective") != "mdlm":
            raise ValueError(f"{self.path} is an AR text model; reverie serve generates with masked diffusion models")
        self.name = self.path.name
        with parsing(self.path / "config.json"):
            self.tokenizer = CharTokenizer.from_dict(self.config["tokenizer"])
            self.max_len = int(self.config["network"]["max_len"])
        sample = self.config.get("sample", {})
        self.defaults = {"sampler": sample.get("sampler", "caching"), "steps": int(sample.get("steps", 128)),
                         "length": int(sample.get("length") or self.max_len), "k": int(sample.get("k", 4)),
                         "window": tuple(sample.get("window", EDLM_WINDOW)),
                         "corrector": 0, "corrector_block": CORRECTOR_BLOCK}  # generate-text's defaults
        self.energy_name = sample.get("energy") or None
        self._lm = self._energy = None
        self._lock = threading.Lock()

    def lm(self):
        with self._lock:
            if self._lm is None:
                from ..language import TextLM

                self._lm = TextLM.load(self.path, self.device)
            return self._lm

    def energy(self):
        """The AR energy model its config names (for edlm), or None."""
        if self.energy_name is None:
            return None
        with self._lock:
            if self._energy is None:
                from ..language import TextLM, resolve_text_model

                self._energy = TextLM.load(resolve_text_model(self.energy_name, relative_to=self.path), self.device)
            return self._energy

    def describe(self, default: bool) -> dict:
        return {"name": self.name, "kind": "text", "default": default, "context": self.max_len,
                "defaults": {k: list(v) if isinstance(v, tuple) else v for k, v in self.defaults.items()},
                "samplers": self.samplers(), "loaded": self._lm is not None}

    def samplers(self) -> list[str]:
        from ..discrete.sampling import MASKED_SAMPLERS

        return [s for s in MASKED_SAMPLERS if s != "edlm" or self.energy_name is not None]


class TextWorker(ModelWorker):
    """One text model's queue and thread. Text jobs run one at a time (``Job.custom``), never batched."""

    def __init__(self, model: TextModel, max_queue: int = 64):  # noqa: D107 - no image memory estimate here
        self.pipe, self.batching, self.max_queue, self.watermark = model, False, max_queue, False
        self.max_batch, self.native_side = 1, None
        self.queue, self.running, self.last, self.batches = [], [], None, 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=f"reverie-text-{model.name}", daemon=True)
        self._thread.start()

    def _run(self, batch: list[Job]) -> None:
        (job,) = batch
        result = job.custom(self._text_callback(job))
        job._resolve("done", result=job.render(job, result))

    def _text_callback(self, job: Job):
        steps = job.steps

        def callback(i, z):
            if not job.done and job.expired():
                self.cancel(job, "timeout")
            if job.done:
                raise Interrupted
            job.step = steps - i + 1

        return callback


def masked_spans(infill: str) -> list[int]:
    """The lengths of the ``[MASK]`` / ``[MASK*N]`` spans of ``infill``, read before any token list is built (an
    N of more than nine digits counts as 10**9: far beyond any context, and never a huge int conversion)."""
    return [(int(m.group(1)) if len(m.group(1)) <= 9 else 10**9) if m.group(1) else 1 for m in _SPAN.finditer(infill)]


def make_text_job(models: dict[str, TextModel], default: str | None, req, timeout: float) -> Job:
    """Check ``req`` (a :class:`~reverie.serve.schemas.TextRequest`) against its model and make its job; every
    problem is a 4xx JobError raised before anything is queued."""
    from ..sampling import SamplingOptions

    if not models:
        raise JobError(404, "NoTextModel", "this server has no text model; start it with --model TEXT_MODEL_DIR")
    name = req.model or default
    if name not in models:
        raise JobError(422, "UnknownModel", f"no text model {name!r} is loaded; loaded: {', '.join(models)}")
    model = models[name]
    d = model.defaults
    sampler = req.sampler or d["sampler"]
    if sampler not in model.samplers():
        raise JobError(422, "InvalidRequest", f"unknown text sampler {sampler!r} for {name}; choose one of "
                                              f"{', '.join(model.samplers())}")
    steps, k = req.steps or d["steps"], req.k or d["k"]
    corrector = d["corrector"] if req.corrector is None else req.corrector
    block = req.corrector_block or d["corrector_block"]
    if req.infill is not None:
        if req.prompt:
            raise JobError(422, "InvalidRequest", "infill takes the whole passage; give no prompt with it")
        if req.length is not None:
            raise JobError(422, "InvalidRequest", "an infill's length is its template's; give no length with it")
        spans = masked_spans(req.infill)
        if not spans or min(spans) < 1:
            raise JobError(422, "InvalidRequest", "an infill template needs masked spans of at least one character, "
                                                  "such as [MASK*20]")
        masked = sum(spans)
        tokens = masked + len(model.tokenizer.encode(_SPAN.sub("", req.infill)))
        if tokens > model.max_len:
            raise JobError(422, "InvalidRequest", f"the infill template is {tokens} tokens, more than the model's "
                                                  f"context of {model.max_len}")
        length = None
    else:
        length = req.length or d["length"]
        if length > model.max_len:
            raise JobError(422, "InvalidRequest", f"length must be at most the model's context, {model.max_len}")
        tokens = len(model.tokenizer.encode(req.prompt))
        if tokens >= length:
            raise JobError(422, "InvalidRequest", f"the prompt is {tokens} tokens, not shorter than length {length}")
    seed = secrets.randbelow(2**32) if req.seed == -1 else req.seed
    params = {"model": name, "prompt": req.prompt, "infill": req.infill, "length": length, "steps": steps,
              "sampler": sampler, "k": k, "window": list(d["window"]), "seed": seed,
              "corrector": corrector, "corrector_block": block,
              "energy": model.energy_name if sampler == "edlm" or corrector else None}

    def run(callback) -> dict:
        from ..language import generate_text

        start = time.perf_counter()
        energy = model.energy() if params["energy"] else None
        texts, stats = generate_text(model.lm(), req.prompt, length, steps, sampler, energy, k, d["window"], seed,
                                     1, req.infill, callback=lambda i, z: callback(i + corrector, z),
                                     corrector=corrector, corrector_block=block)  # job.step counts steps + sweeps
        return {"text": texts[0], "parameters": params, "denoiser_rows": stats.denoiser_rows,
                "energy_rows": stats.energy_rows,
                "corrector_acceptance": stats.accepted / stats.proposals if stats.proposals else None,
                "seconds": round(time.perf_counter() - start, 3)}

    job = Job(options=SamplingOptions(), images=[ImageSpec(req.prompt or req.infill or "", seed)],
              render=lambda job, result: {**result, "job": job.id}, timeout=timeout, model_name=name,
              custom=run, steps=steps + corrector)
    return job
