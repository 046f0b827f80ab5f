"""The FastAPI application: the page, AUTOMATIC1111's API, reverie's own ``/v1`` routes, and the guard.

``create_app(pipelines, ServeConfig(...))`` builds it around models that are already loaded; the queue
and worker of each model live in ``reverie.serve.worker``. Every error a client can cause is a 4xx JSON
body ``{"error": kind, "detail": one line}``; a 500 means a bug and carries no traceback (the server log
has it).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import importlib.resources
import importlib.util
import json
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..images import to_pil
from ..layout import check_layout
from ..samplers import GRIDS, SAMPLERS
from ..sampling import SamplingOptions, resolve_layouts, sigma_grid
from ..sd import FAMILY as SD_FAMILY
from .images import BadImage, b64, decode_image, png_bytes, preview_jpeg
from .schemas import (
    MAX_BODY_BYTES,
    MAX_IMAGES,
    EditRequest,
    Img2ImgRequest,
    LayoutRequest,
    OptionsRequest,
    PngInfoRequest,
    TextRequest,
    Txt2ImgRequest,
)
from .text import TextModel, TextWorker, make_text_job
from .worker import ImageSpec, Job, JobError, ModelWorker

STATIC = importlib.resources.files("reverie.serve") / "static"
# AUTOMATIC1111's sampler names -> reverie's (its /samplers list shows these, and clients send them back)
A1111_SAMPLERS = {"DDPM": "ddpm", "DDIM": "ddim", "Euler": "euler", "Euler a": "euler_ancestral", "Heun": "heun",
                  "DPM++ 2M": "dpmpp_2m", "DPM++ 2M SDE": "dpmpp_2m_sde", "UniPC": "unipc"}
# A1111's scheduler names -> reverie's grid kinds ("Automatic": the model's own)
A1111_SCHEDULERS = {"automatic": None, "karras": "karras", "exponential": "exponential",
                    "uniform": "ddim-trailing", "ddim": "ddim-leading"}
KEEP_FINISHED_JOBS = 64      # finished /v1/jobs results kept for polling, newest first
KEEP_FINISHED_SECONDS = 600


@dataclass
class ServeConfig:
    """``api_key``: required on every API route when set. ``allowed_hosts``: Host headers accepted (None: any;
    the CLI sets the loopback names when it binds to loopback, against DNS rebinding). ``timeout``: seconds
    a request may take, queue included."""

    api_key: str | None = None
    allowed_hosts: frozenset[str] | None = None
    timeout: float = 120.0
    max_batch: int = 16
    max_queue: int = 64
    batching: bool = True
    watermark: bool = True
    max_body_bytes: int = MAX_BODY_BYTES


def error(status: int, kind: str, detail: str, **extra) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": detail, **extra}, status_code=status)


class Guard:
    """Pure ASGI middleware in front of every route: the Host header, the body size (counted, not trusted from
    Content-Length), JSON-only POST bodies (a cross-site form cannot send one without a CORS preflight, which
    this server never grants), and the API key."""

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refuse(scope, headers)
        if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body, refusal = await self._read_body(receive)
            if refusal is None:
                receive = _replay(body, receive)
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def _refuse(self, scope, headers: dict) -> JSONResponse | None:
        hosts = self.config.allowed_hosts
        if hosts is not None and _host_name(headers.get("host", "")) not in hosts:
            return error(400, "BadHost", "this server answers only requests addressed to "
                                         + ", ".join(sorted(hosts)))
        path = scope["path"]
        if scope["method"] in ("POST", "PUT", "PATCH"):
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return error(415, "UnsupportedMediaType", "send the body as JSON with Content-Type: application/json")
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.config.max_body_bytes):
                return error(413, "TooLarge", f"the body is larger than {self.config.max_body_bytes} bytes")
        if self.config.api_key and path.startswith(("/sdapi/", "/v1/")) and not self._authorized(headers):
            return JSONResponse({"error": "Unauthorized", "detail": "this server needs its API key: send "
                                 "'Authorization: Bearer KEY' or 'X-API-Key: KEY'"}, status_code=401,
                                headers={"WWW-Authenticate": 'Bearer realm="reverie"'})
        return None

    def _authorized(self, headers: dict) -> bool:
        key = self.config.api_key.encode()
        given = headers.get("x-api-key", "")
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        elif auth.lower().startswith("basic "):  # A1111's --api-auth user:password; the password is the key
            try:
                given = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                given = ""
        return hmac.compare_digest(given.encode("utf-8", "replace"), key)

    async def _read_body(self, receive):
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", error(400, "Disconnected", "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.config.max_body_bytes:
                return b"", error(413, "TooLarge", f"the body is larger than {self.config.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _host_name(host: str) -> str:
    if host.startswith("["):  # [::1]:7860
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class Server:
    """The loaded models, their workers, the default model and the jobs the page polls."""

    def __init__(self, pipelines: list, config: ServeConfig, text_models: list[TextModel] = ()):
        if not pipelines:
            raise ValueError("reverie serve needs at least one model")
        names = [p.name for p in pipelines] + [m.name for m in text_models]
        if len(set(names)) != len(names):
            raise ValueError(f"two models have the same name ({', '.join(names)}); give each its own directory name")
        self.config = config
        self.pipes = {p.name: p for p in pipelines}
        self.workers = {p.name: ModelWorker(p, config.max_batch, config.max_queue, config.batching, config.watermark)
                        for p in pipelines}
        self.default = names[0]
        self.text = {m.name: m for m in text_models}  # text models: weights load on their first request
        self.text_default = text_models[0].name if text_models else None
        self.workers.update({m.name: TextWorker(m, config.max_queue) for m in text_models})
        self.native = {p.name: _image_size(p) for p in pipelines}  # before any request changes an SD model's size
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.started = time.time()

    def model(self, name: str | None):
        """The loaded model called ``name`` (or A1111's "name [hash]" title); nothing else is ever opened."""
        if name is None:
            return self.pipes[self.default]
        key = name.split(" [")[0].strip()
        if key not in self.pipes:
            raise JobError(422, "UnknownModel", f"no model {name!r} is loaded; loaded: {', '.join(self.pipes)}")
        return self.pipes[key]

    def remember(self, job: Job) -> None:
        self.jobs[job.id] = job
        now = time.monotonic()
        for old in [j for j in self.jobs.values() if j.done and now - j.finished > KEEP_FINISHED_SECONDS]:
            del self.jobs[old.id]
        finished = [j for j in self.jobs.values() if j.done]
        for old in finished[:max(0, len(finished) - KEEP_FINISHED_JOBS)]:
            del self.jobs[old.id]

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()


# -- from a request to a job ---------------------------------------------------------------------------------

def sampler_of(req: Txt2ImgRequest) -> str | None:
    name = req.sampler_name or req.sampler_index
    if name is None:
        return None
    if name in SAMPLERS:
        return name
    by_a1111 = {k.lower(): v for k, v in A1111_SAMPLERS.items()}
    if name.lower() in by_a1111:
        return by_a1111[name.lower()]
    raise JobError(422, "InvalidRequest", f"unknown sampler {name!r}; choose one of "
                                          f"{', '.join(sorted(SAMPLERS))} (or their A1111 names)")


def grid_of(req: Txt2ImgRequest):
    import torch

    if isinstance(req.grid, list):
        return torch.tensor(req.grid, dtype=torch.float64)
    if req.grid is not None:
        return req.grid  # SamplingOptions checks the kind
    if req.scheduler is None:
        return None
    if req.scheduler in GRIDS:
        return req.scheduler
    if req.scheduler.lower() in A1111_SCHEDULERS:
        return A1111_SCHEDULERS[req.scheduler.lower()]
    raise JobError(422, "InvalidRequest", f"unknown scheduler {req.scheduler!r}; choose one of "
                                          f"{', '.join(GRIDS)} or Automatic")


def make_job(server: Server, req: Txt2ImgRequest) -> Job:
    """Check ``req`` against its model (sampler, grid range, layout, prompt) and make its job; every problem is a
    JobError with a 4xx status, raised before anything is queued."""
    override = req.override_settings or {}
    wanted = req.model or override.get("sd_model_checkpoint")
    pipe = server.model(wanted if isinstance(wanted, str) else None)
    n = req.batch_size * req.n_iter
    if n > MAX_IMAGES:
        raise JobError(422, "InvalidRequest", f"batch_size x n_iter must be at most {MAX_IMAGES}, got {n}")
    if pipe.conditioning != "text" and req.prompt:
        raise JobError(422, "InvalidRequest", f"model {pipe.name!r} is not text-conditioned; leave the prompt empty")
    seed = secrets.randbelow(2**32) if req.seed == -1 else req.seed
    if seed + n - 1 > 2**63 - 1:
        raise JobError(422, "InvalidRequest", "seed + number of images must stay below 2**63")
    layout = req.layout
    if isinstance(layout, str) and layout not in ("auto", "none"):
        raise JobError(422, "InvalidRequest",
                       f"layout must be 'auto', 'none' or a list of [phrase, box], got {layout!r}")
    try:
        if isinstance(layout, list):
            layout = check_layout(layout, "layout")
            resolve_layouts(pipe, [req.prompt], [layout])  # refuses boxes for a model that takes none
        options = SamplingOptions(sampler=sampler_of(req), steps=req.steps, grid=grid_of(req),
                                  guidance_scale=req.cfg_scale, guidance_rescale=req.guidance_rescale,
                                  negative_prompt=req.negative_prompt, seed=seed).resolve(pipe.cfg)
        sigma_grid(pipe, options.steps, options.grid)
    except ValueError as e:
        raise JobError(422, "InvalidRequest", str(e)) from None
    images = [ImageSpec(req.prompt, seed + i, layout) for i in range(n)]
    native = server.native[pipe.name]
    size = (req.width or native[0], req.height or native[1])
    sample_size = None
    if pipe.info.get("family") == SD_FAMILY:  # Stable Diffusion samples at the size asked for; reverie's models resize
        sample_size = size = _sd_size(pipe, req.width, req.height, native)
    return Job(options=options, images=images, timeout=server.config.timeout, model_name=pipe.name,
               sample_size=sample_size, render=lambda job, pil: render(server, req, job, pil, size, native))


def _image_size(pipe) -> tuple[int, int]:
    """(width, height) of the images the model makes now (decoded, for a latent model)."""
    _, h, w = pipe.image_shape
    return w, h


def _sd_size(pipe, width: int | None, height: int | None, native: tuple[int, int]) -> tuple[int, int]:
    """(width, height) a Stable Diffusion model samples at: as asked (multiples of the autoencoder's factor; one
    side given: square), else the model's own."""
    width = width or height or native[0]
    height = height or width
    factor = pipe.vae.config.downsample_factor
    if width % factor or height % factor:
        raise JobError(422, "InvalidRequest", f"a Stable Diffusion model makes images whose sides are multiples "
                                              f"of {factor}; got {width}x{height}")
    return width, height


def image_params(pipe, job: Job, image: ImageSpec, size: tuple[int, int], native: tuple[int, int],
                 watermark) -> dict:
    """What one PNG says made it: the keys of ``reverie generate``'s PNGs (so ``--from-png`` reproduces it)."""
    options = dataclasses.replace(job.options, seed=image.seed,
                                  layouts=[image.layout] if isinstance(image.layout, list) else image.layout)
    params = {"prompt": image.prompt, "num_images": 1, **options.to_metadata(), "model": pipe.name,
              "model_hash": pipe.weights_hash, **job.extra}
    if job.custom is None:  # an edit starts from the input image, not from (watermarked) noise
        params["watermark"] = watermark
    if job.sample_size is not None:  # as `reverie generate --width/--height` records it
        params.update(width=size[0], height=size[1])
    elif size != native:
        params["resized_to"] = list(size)
    return params


def infotext(p: dict, size) -> str:
    """A1111's one-paragraph parameters text, which its clients parse."""
    neg = f"\nNegative prompt: {p['negative_prompt']}" if p["negative_prompt"] else ""
    return (f"{p['prompt']}{neg}\nSteps: {p['steps']}, Sampler: {p['sampler']}, CFG scale: {p['guidance']}, "
            f"Seed: {p['seed']}, Size: {size[0]}x{size[1]}, Model hash: {p['model_hash']}, Model: {p['model']}")


def render(server: Server, req: Txt2ImgRequest, job: Job, pil: list, size: tuple[int, int],
           native: tuple[int, int]) -> dict:
    """The A1111 reply: base64 PNGs (through the shared writer), the request's parameters, and ``info``."""
    from PIL import Image as PILImage

    pipe, worker = server.pipes[job.model_name], server.workers[job.model_name]
    record = worker.noise(job.images[0].seed)[1]  # the same for every image: it names the key, not the noise
    params = [image_params(pipe, job, img, size, native, record) for img in job.images]
    images = []
    if req.send_images:
        for im, p in zip(pil, params):
            if im.size != size:
                im = im.resize(size, PILImage.LANCZOS)
            images.append(b64(png_bytes(im, p, watermark=server.config.watermark)))
    o = job.options
    info = {"prompt": req.prompt, "all_prompts": [req.prompt] * len(params), "negative_prompt": o.negative_prompt,
            "all_negative_prompts": [o.negative_prompt] * len(params), "seed": params[0]["seed"],
            "all_seeds": [p["seed"] for p in params], "sampler_name": o.sampler, "steps": o.steps,
            "cfg_scale": o.guidance_scale, "width": size[0], "height": size[1], "batch_size": req.batch_size,
            "n_iter": req.n_iter, "sd_model_name": pipe.name, "sd_model_hash": pipe.weights_hash,
            "native_size": list(native), "infotexts": [infotext(p, size) for p in params],
            "reverie": params, "job": job.id}
    parameters = req.model_dump(exclude={"init_images", "mask"})
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


def job_status(job: Job, server: Server, with_result: bool = True) -> dict:
    out = {"id": job.id, "state": job.state, "step": job.step, "steps": job.steps,
           "images": len(job.images), "elapsed": round(time.monotonic() - job.created, 3)}
    if job.state == "queued":
        worker = next((w for w in server.workers.values() if job in w.queue), None)
        out["queue_position"] = worker.queue.index(job) if worker is not None else 0
    preview = job.preview
    if preview is not None:
        out["preview"] = preview_jpeg(to_pil(preview[None])[0])
    if job.error is not None:
        out["error"] = {"error": job.error.kind, "detail": job.error.message}
    if with_result and job.result is not None:
        out["result"] = job.result
    return out


# -- the application -----------------------------------------------------------------------------------------

def create_app(pipelines: list, config: ServeConfig | None = None, text_models: list | None = None) -> FastAPI:
    """The app around already loaded ``pipelines`` (the first is the default model) and ``text_models``
    (:class:`~reverie.serve.text.TextModel` or their directories / shipped names; the first is the default)."""
    config = config or ServeConfig()
    text = [m if isinstance(m, TextModel) else TextModel(m) for m in (text_models or [])]
    server = Server(pipelines, config, text)
    app = FastAPI(title="reverie", version=_version(), docs_url=None, redoc_url=None,
                  description="reverie's image generation API: AUTOMATIC1111's /sdapi/v1 routes and reverie's "
                              "own /v1 routes. The page is at /, this API described at /docs.")
    app.state.server = server
    app.add_middleware(Guard, config=config)
    _add_error_handlers(app)
    app.router.on_shutdown.append(server.close)
    _add_page_routes(app)
    _add_a1111_routes(app, server)
    _add_own_routes(app, server)
    return app


def _version() -> str:
    from .. import __version__

    return __version__


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type"))}
                  for e in exc.errors()[:20]]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(x for x in first["loc"] if x != "body")
        return error(422, "InvalidRequest", f"{where}: {first['msg']}" if where else first["msg"], errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        return error(exc.status_code, kind, str(exc.detail))

    @app.exception_handler(JobError)
    async def job_error(request, exc: JobError):
        return error(exc.status, exc.kind, exc.message)

    @app.exception_handler(BadImage)
    async def bad_image(request, exc: BadImage):
        return error(422, "InvalidImage", str(exc))

    @app.exception_handler(Exception)
    async def bug(request, exc: Exception):  # logged by the server; the client gets no traceback
        import traceback

        traceback.print_exception(exc)
        return error(500, "InternalError", "the server failed on this request; its log has the details")


def _add_page_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def docs():  # FastAPI's own docs page loads Swagger UI from a CDN; this one is local
        return FileResponse(str(STATIC / "api.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")


async def wait_for(server: Server, job: Job, request: Request | None = None) -> dict:
    """Queue ``job`` and wait for it without blocking the loop. A timeout cancels it (504), and so does the
    client going away (checked twice a second), so that nobody's abandoned request holds the worker."""
    worker = server.workers[job.model_name]
    job.loop = asyncio.get_running_loop()
    job.future = job.loop.create_future()
    worker.submit(job)
    deadline = job.loop.time() + job.timeout
    try:
        while not job.future.done():
            left = deadline - job.loop.time()
            if left <= 0:
                worker.cancel(job, "timeout")
                break
            await asyncio.wait({job.future}, timeout=min(0.5, left))
            if request is not None and not job.future.done() and await request.is_disconnected():
                worker.cancel(job)
                break
    except asyncio.CancelledError:
        worker.cancel(job)
        raise
    if job.error is not None:
        raise job.error
    return job.result


def _add_a1111_routes(app: FastAPI, server: Server) -> None:
    @app.post("/sdapi/v1/txt2img", tags=["A1111"])
    async def txt2img(req: Txt2ImgRequest, request: Request) -> dict:
        """Text to image with AUTOMATIC1111's fields; the reply holds base64 PNGs, the parameters and ``info``."""
        return await wait_for(server, make_job(server, req), request)

    @app.post("/sdapi/v1/img2img", tags=["A1111"])
    async def img2img(req: Img2ImgRequest, request: Request) -> dict:
        """Image to image and inpainting (mask: white repaints) with A1111's fields."""
        return await wait_for(server, _img2img_job(server, req), request)

    @app.get("/sdapi/v1/progress", tags=["A1111"])
    async def progress(skip_current_image: bool = False) -> dict:
        """The running job's progress and its current denoising estimate."""
        running = [j for w in server.workers.values() for j in w.running if not j.done]
        job = running[0] if running else None
        queued = sum(len(w.queue) for w in server.workers.values())
        state = {"skipped": False, "interrupted": False, "job": job.id if job else "",
                 "job_count": len(running) + queued,
                 "job_timestamp": "", "job_no": 0, "sampling_step": job.step if job else 0,
                 "sampling_steps": job.steps if job else 0}
        image = None
        if job is not None and not skip_current_image and job.preview is not None:
            image = preview_jpeg(to_pil(job.preview[None])[0])
        frac = job.step / job.steps if job and job.steps else 0.0
        eta = (time.monotonic() - job.created) * (1 - frac) / frac if job and frac > 0 else 0.0
        return {"progress": frac, "eta_relative": eta, "state": state, "current_image": image, "textinfo": None}

    @app.post("/sdapi/v1/interrupt", tags=["A1111"])
    async def interrupt() -> dict:
        """Cancel the jobs now running (queued ones stay queued)."""
        return {"interrupted": sum(w.interrupt() for w in server.workers.values())}

    @app.get("/sdapi/v1/sd-models", tags=["A1111"])
    async def sd_models() -> list:
        return [{"title": f"{p.name} [{p.weights_hash[:10]}]", "model_name": p.name, "hash": p.weights_hash[:10],
                 "sha256": p.weights_hash, "filename": p.name, "config": None} for p in server.pipes.values()]

    @app.get("/sdapi/v1/samplers", tags=["A1111"])
    async def samplers() -> list:
        by_reverie = {v: k for k, v in A1111_SAMPLERS.items()}
        return [{"name": by_reverie.get(s, s), "aliases": [s], "options": {}} for s in sorted(SAMPLERS)]

    @app.get("/sdapi/v1/schedulers", tags=["A1111"])
    async def schedulers() -> list:
        return [{"name": g, "label": g, "aliases": None} for g in GRIDS]

    @app.get("/sdapi/v1/options", tags=["A1111"])
    async def get_options() -> dict:
        pipe = server.pipes[server.default]
        return {"sd_model_checkpoint": f"{pipe.name} [{pipe.weights_hash[:10]}]", "samples_format": "png"}

    @app.post("/sdapi/v1/options", tags=["A1111"])
    async def set_options(req: OptionsRequest) -> dict:
        """Only ``sd_model_checkpoint`` is a setting: the default model, among the loaded ones."""
        if req.sd_model_checkpoint is not None:
            server.default = server.model(req.sd_model_checkpoint).name
        return {"sd_model_checkpoint": server.default}

    @app.post("/sdapi/v1/png-info", tags=["A1111"])
    async def png_info(req: PngInfoRequest) -> dict:
        """The parameters a reverie PNG carries."""
        im = decode_image(req.image, "image")
        return {"info": im.info.get("parameters", "") if hasattr(im, "info") else "", "items": {}}


def _img2img_job(server: Server, req: Img2ImgRequest | EditRequest) -> Job:
    if importlib.util.find_spec("reverie.editing") is None:
        for i, text in enumerate(req.init_images):  # still a 4xx for a malformed request
            decode_image(text, f"init_images[{i}]")
        make_job(server, req)
        raise JobError(501, "NotImplemented", "img2img and inpainting need reverie.editing, which this version "
                                              "does not have")
    from .edits import make_edit_job

    return make_edit_job(server, req, make_job)


def _add_own_routes(app: FastAPI, server: Server) -> None:
    @app.get("/v1/health", tags=["reverie"])
    async def health() -> dict:
        return {"status": "ok", "models": list(server.pipes), "text_models": list(server.text),
                "queued": {n: len(w.queue) for n, w in server.workers.items()},
                "batches": {n: w.batches for n, w in server.workers.items()}}

    @app.get("/v1/models", tags=["reverie"])
    async def models() -> list:
        """The loaded models with their own sampling defaults (what a request's missing fields become)."""
        out = []
        for name, p in server.pipes.items():
            s = p.cfg.sample
            width, height = server.native[name]
            out.append({"name": name, "hash": p.weights_hash, "default": name == server.default,
                        "conditioning": p.conditioning, "width": width, "height": height,
                        "layouts": p.takes_layouts, "max_batch": server.workers[name].max_batch,
                        "defaults": {"sampler": s.sampler, "steps": s.steps, "grid": s.grid,
                                     "guidance": s.guidance_scale},
                        "example_prompts": list(s.prompts)})
        return out

    @app.get("/v1/grids", tags=["reverie"])
    async def grids() -> dict:
        """Sigma grid kinds; a request's ``grid`` may also be explicit sigmas, e.g. a tuned grid's."""
        return {"kinds": list(GRIDS), "tuned": "pass the sigmas of `reverie tune-grid`'s JSON as the grid field"}

    @app.post("/v1/layout", tags=["reverie"])
    async def layout(req: LayoutRequest) -> dict:
        """The object boxes the model's planner draws for a prompt and seed (layout models)."""
        pipe = server.model(req.model)
        if not pipe.takes_layouts:
            raise JobError(422, "InvalidRequest", f"model {pipe.name!r} takes no layouts")
        planned = resolve_layouts(pipe, [req.prompt], "auto", req.seed)[0]
        return {"layout": None if planned is None else [[ph, [float(v) for v in box]] for ph, box in planned]}

    def queue(job: Job) -> dict:
        server.workers[job.model_name].submit(job)
        server.remember(job)
        return job_status(job, server)

    @app.post("/v1/jobs/txt2img", tags=["reverie"], status_code=202)
    async def submit_txt2img(req: Txt2ImgRequest) -> dict:
        """Queue a txt2img request and return at once; poll ``GET /v1/jobs/{id}`` for progress, previews and
        the result (the page does this)."""
        return queue(make_job(server, req))

    @app.get("/v1/text/models", tags=["reverie"])
    async def text_models() -> list:
        """The text models, their context, samplers and own defaults (what a text request's missing fields
        become); ``loaded`` says whether the weights are in memory yet (they load on the first request)."""
        return [m.describe(name == server.text_default) for name, m in server.text.items()]

    @app.post("/v1/text", tags=["reverie"])
    async def text(req: TextRequest, request: Request) -> dict:
        """Text from a masked diffusion text model: ``prompt`` + ``length``, or an ``infill`` passage with
        ``[MASK*N]`` spans. The same seed and settings give ``reverie generate-text``'s text."""
        return await wait_for(server, make_text_job(server.text, server.text_default, req, server.config.timeout),
                              request)

    @app.post("/v1/jobs/text", tags=["reverie"], status_code=202)
    async def submit_text(req: TextRequest) -> dict:
        """Queue a text request and return at once; poll ``GET /v1/jobs/{id}`` (its result is /v1/text's)."""
        return queue(make_text_job(server.text, server.text_default, req, server.config.timeout))

    @app.post("/v1/jobs/img2img", tags=["reverie"], status_code=202)
    async def submit_img2img(req: Img2ImgRequest) -> dict:
        """Queue an img2img or inpainting request; poll as for txt2img."""
        return queue(_img2img_job(server, req))

    @app.post("/v1/edit", tags=["reverie"])
    async def prompt_edit(req: EditRequest, request: Request) -> dict:
        """A prompt edit: ``init_images[0]`` inverted under ``from_prompt``, regenerated under ``prompt``
        (``reverie edit IMAGE --from-prompt P --to-prompt Q``); the reply is img2img's."""
        return await wait_for(server, _img2img_job(server, req), request)

    @app.post("/v1/jobs/edit", tags=["reverie"], status_code=202)
    async def submit_edit(req: EditRequest) -> dict:
        """Queue a prompt edit; poll as for txt2img."""
        return queue(_img2img_job(server, req))

    @app.get("/v1/jobs/{job_id}", tags=["reverie"])
    async def status(job_id: str) -> dict:
        return job_status(_find(server, job_id), server)

    @app.delete("/v1/jobs/{job_id}", tags=["reverie"])
    async def cancel(job_id: str) -> dict:
        job = _find(server, job_id)
        server.workers[job.model_name].cancel(job)
        return job_status(job, server, with_result=False)


def _find(server: Server, job_id: str) -> Job:
    job = server.jobs.get(job_id)
    if job is None:
        raise JobError(404, "NotFound", f"no job {job_id[:40]!r} (finished jobs are kept {KEEP_FINISHED_SECONDS} s)")
    return job
