"""reverie serve through FastAPI's TestClient: the A1111 replies against the library's own images, batching,
cancel, timeouts, the guard (API key, Host, body size, content type), bounded inputs and the jobs the page
polls. The browser test is tests/test_browser.py; malformed requests in bulk are tests/test_serve_fuzz.py."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from reverie.cli.common import DEFAULT_MODEL  # noqa: E402
from reverie.pipeline import Pipeline  # noqa: E402
from reverie.samplers import SAMPLERS  # noqa: E402
from reverie.serve import ServeConfig, create_app  # noqa: E402
from reverie.serve.worker import DETERMINISTIC_SAMPLERS, ImageSpec, Job, ModelWorker  # noqa: E402

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app([pipe], ServeConfig())) as c:
        yield c


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.int16)


def png_of_size(w: int, h: int) -> str:
    """A tiny PNG file whose header claims w x h (its pixel data is one short zlib stream)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


def library_image(pipe, prompt: str, seed: int, **settings) -> Image.Image:
    """The library's one image of ``seed``: its start noise watermarked as ``reverie generate`` draws it."""
    from reverie.images import to_pil
    from reverie.provenance import watermark_noise
    from reverie.sampling import SamplingOptions, sample_images

    noise = watermark_noise(pipe, 1, seed)[0]
    return to_pil(sample_images(pipe, 1, SamplingOptions(seed=seed, **settings), prompts=[prompt], noise=noise))[0]


def png_b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_txt2img_reply_matches_the_library(client, pipe):
    """Image i of a request is the library's one image of seed + i: the same pixels, and the PNG says so, with
    Content Credentials that validate and the noise watermark's record."""
    from reverie.provenance.credentials import read_credentials

    r = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 11, "batch_size": 2, "steps": 6,
                                               "sampler_name": "DPM++ 2M", "cfg_scale": 3.0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"}
    info = json.loads(body["info"])
    assert info["all_seeds"] == [11, 12] and info["sampler_name"] == "dpmpp_2m" and info["steps"] == 6
    assert body["parameters"]["seed"] == 11 and body["parameters"]["cfg_scale"] == 3.0
    for i, b64 in enumerate(body["images"]):
        im = decode(b64)
        assert im.format == "PNG" and im.size == (32, 32)
        meta = json.loads(im.text["reverie"])
        assert meta["seed"] == 11 + i and meta["num_images"] == 1 and meta["model_hash"] == pipe.weights_hash
        assert meta == info["reverie"][i] and meta["watermark"]["noise"]["scheme"] == "tree-ring-v1"
        ref = library_image(pipe, PROMPT, 11 + i, steps=6, guidance_scale=3.0, sampler="dpmpp_2m")
        # the server samples the batch of 2 in one call, the library one image: oneDNN may pick other kernels
        # per batch size, so a pixel may round to the next 8-bit level (seen once in five runs), never more
        diff = np.abs(pixels(im).astype(int) - pixels(ref).astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
        assert read_credentials(base64.b64decode(b64)).state in ("Valid", "Trusted")
    assert not np.array_equal(pixels(decode(body["images"][0])), pixels(decode(body["images"][1])))


def test_a_returned_png_reproduces_from_the_command_line(client, tmp_path):
    from reverie.cli import main

    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a green triangle", "seed": 5, "steps": 5,
                                               "negative_prompt": "red", "scheduler": "Karras"})
    assert r.status_code == 200, r.text
    served = tmp_path / "served.png"
    served.write_bytes(base64.b64decode(r.json()["images"][0]))
    assert json.loads(Image.open(served).text["reverie"])["grid"] == "karras"
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(served), "-o", str(again), "-q"]) == 0
    assert np.array_equal(pixels(Image.open(served)), pixels(Image.open(again)))


def test_requests_with_the_same_settings_share_a_batch(pipe):
    """Three requests queued while the worker is held run as one batch, and each image equals its solo one."""
    worker = ModelWorker(pipe, max_batch=16)
    try:
        from reverie.sampling import SamplingOptions

        options = SamplingOptions(steps=4, seed=0).resolve(pipe.cfg)
        prompts = ["a red circle", "a blue square", "a yellow star"]
        jobs = [Job(options=options, images=[ImageSpec(p, 100 + k, "auto")], timeout=60,
                    render=lambda job, pil: {"pil": pil}) for k, p in enumerate(prompts)]
        with worker._cond:  # the worker cannot take a job until all three are queued
            for job in jobs:
                worker.submit(job)
        deadline = time.monotonic() + 60
        while not all(j.done for j in jobs) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [j.state for j in jobs] == ["done"] * 3
        assert worker.batches == 1
        for k, (job, p) in enumerate(zip(jobs, prompts)):
            ref = library_image(pipe, p, 100 + k, steps=4)
            assert np.abs(pixels(job.result["pil"][0]) - pixels(ref)).max() <= 1  # float rounding of a batch
    finally:
        worker.close()


def test_stochastic_samplers_run_alone_and_match_the_library(pipe):
    worker = ModelWorker(pipe, max_batch=16)
    try:
        from reverie.sampling import SamplingOptions

        options = SamplingOptions(sampler="euler_ancestral", steps=4, seed=0).resolve(pipe.cfg)
        jobs = [Job(options=options, images=[ImageSpec("a red circle", 7 + k, "auto")], timeout=60,
                    render=lambda job, pil: {"pil": pil}) for k in range(2)]
        with worker._cond:
            for job in jobs:
                worker.submit(job)
        while not all(j.done for j in jobs):
            time.sleep(0.02)
        assert worker.batches == 2
        for k, job in enumerate(jobs):
            ref = library_image(pipe, "a red circle", 7 + k, sampler="euler_ancestral", steps=4)
            assert np.array_equal(pixels(job.result["pil"][0]), pixels(ref))
    finally:
        worker.close()


@pytest.mark.parametrize("name", sorted(DETERMINISTIC_SAMPLERS))
def test_batched_samplers_draw_no_noise_after_the_start(pipe, name):
    """A sampler may share a batch only if its result does not depend on the step generator."""
    from reverie.sampling import SamplingOptions, sample_images

    assert name in SAMPLERS
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    outs = [sample_images(pipe, 1, SamplingOptions(sampler=name, steps=3, seed=s, layouts="none"),
                          prompts=["a red circle"],
                          noise=noise) for s in (1, 2)]
    assert torch.equal(outs[0], outs[1])


def test_no_watermark_server(pipe):
    """--no-watermark: the seed's plain noise (the library's unmarked image), and every PNG says "off"."""
    with TestClient(create_app([pipe], ServeConfig(watermark=False))) as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 4, "steps": 3})
        im = decode(r.json()["images"][0])
        assert json.loads(im.text["reverie"])["watermark"] == "off"
        assert np.array_equal(pixels(im), pixels(pipe.generate("a red circle", 1, steps=3, seed=4)[0]))


def test_width_and_height_resize_the_reply(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 3, "width": 64, "height": 48})
    assert r.status_code == 200, r.text
    im = decode(r.json()["images"][0])
    assert im.size == (64, 48)
    assert json.loads(im.text["reverie"])["resized_to"] == [64, 48]


def test_send_images_false_and_random_seed(client):
    r = client.post("/sdapi/v1/txt2img", json={"steps": 2, "send_images": False, "seed": -1})
    assert r.status_code == 200
    body = r.json()
    assert body["images"] == [] and 0 <= json.loads(body["info"])["seed"] < 2**32


def test_listing_routes(client, pipe):
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == [pipe.name] and models[0]["sha256"] == pipe.weights_hash
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {s["aliases"][0] for s in samplers} == set(SAMPLERS)
    assert {"name": "Euler a", "aliases": ["euler_ancestral"], "options": {}} in samplers
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith(pipe.name)
    own = client.get("/v1/models").json()[0]
    assert own["defaults"] == {"sampler": "dpmpp_2m", "steps": 20, "grid": "ddim-trailing", "guidance": 4.0}
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": pipe.name}).status_code == 200
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "/etc/passwd"})
    assert r.status_code == 422 and r.json()["error"] == "UnknownModel"
    spec = client.get("/openapi.json").json()
    assert "/sdapi/v1/txt2img" in spec["paths"] and "/v1/jobs/txt2img" in spec["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "<textarea id=\"prompt\"" in page.text
    for asset in ("/static/app.js", "/static/style.css", "/docs"):
        text = client.get(asset).text
        assert "http://" not in text and "https://" not in text  # nothing from a CDN


def test_layout_route_and_explicit_layouts(client):
    r = client.post("/v1/layout", json={"prompt": PROMPT, "seed": 3})
    boxes = r.json()["layout"]
    assert [phrase for phrase, _ in boxes] == ["red circle", "blue square"]
    (_, a), (_, b) = boxes
    assert a[3] <= b[1] + 1e-9  # "above": the circle's box ends where the square's begins, or higher
    r = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 3, "layout": boxes})
    assert r.status_code == 200, r.text
    bad = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "layout": [["x", [0.5, 0.5, 0.1, 0.1]]]})
    assert bad.status_code == 422 and "box" in bad.json()["detail"]


@pytest.mark.parametrize("body, words", [
    ({"steps": 0}, "steps"),
    ({"steps": 10**6}, "steps"),
    ({"steps": "20"}, "steps"),
    ({"cfg_scale": 1e9}, "cfg_scale"),
    ({"batch_size": 8, "n_iter": 8}, "at most 16"),
    ({"batch_size": 1000}, "batch_size"),
    ({"prompt": "x" * 5000}, "2000"),
    ({"sampler_name": "../../bin/sh"}, "unknown sampler"),
    ({"model": "../../etc/passwd"}, "no model"),
    ({"override_settings": {"sd_model_checkpoint": "/tmp/evil"}}, "no model"),
    ({"width": 100000}, "width"),
    ({"grid": [1.0, 2.0, 0.0]}, "non-increasing"),
    ({"grid": "nonsense"}, "grid"),
    ({"scheduler": "bogus"}, "scheduler"),
    ({"seed": -5}, "seed"),
    ({"seed": 2**63 - 1, "batch_size": 2}, "2**63"),
    ({"guidance_rescale": 2}, "guidance_rescale"),
    ({"layout": "everywhere"}, "layout"),
])
def test_bounded_inputs_are_4xx_json(client, body, words):
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"] in ("InvalidRequest", "UnknownModel") and words in r.json()["detail"]


def test_uploaded_images_are_bounded_and_never_fetched(client):
    img = png_b64(Image.new("RGB", (32, 32), (200, 10, 10)))
    cases = {
        png_of_size(100_000, 100_000): "larger than",      # a decompression bomb: refused from its header
        "https://example.com/cat.png": "not a URL",
        "data:image/png,notbase64": "base64",
        "!!!!": "base64",
        base64.b64encode(b"GIF89a-truncated").decode(): "not a readable image",
    }
    for init, words in cases.items():
        r = client.post("/sdapi/v1/img2img", json={"init_images": [init]})
        assert r.status_code == 422 and words in r.json()["detail"], (words, r.text)
    r = client.post("/sdapi/v1/img2img", json={"init_images": [img], "mask": "%%%"})
    assert r.status_code == 422 and "mask" in r.json()["detail"]
    assert client.post("/sdapi/v1/img2img", json={}).status_code == 422


def test_body_size_content_type_and_host(pipe):
    app = create_app([pipe], ServeConfig(max_body_bytes=10_000, allowed_hosts=frozenset({"127.0.0.1", "localhost"})))
    with TestClient(app, base_url="http://127.0.0.1:7860") as c:
        big = json.dumps({"prompt": "x" * 20_000})
        r = c.post("/sdapi/v1/txt2img", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"] == "TooLarge"

        def chunks():  # no Content-Length: the guard counts what arrives
            for _ in range(20):
                yield b" " * 1000
        r = c.post("/sdapi/v1/txt2img", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = c.post("/sdapi/v1/txt2img", content=b'{"prompt": ""}', headers={"content-type": "text/plain"})
        assert r.status_code == 415  # a cross-site form cannot post JSON
        r = c.get("/v1/health", headers={"host": "evil.example:7860"})
        assert r.status_code == 400 and r.json()["error"] == "BadHost"  # DNS rebinding
        assert c.get("/v1/health", headers={"host": "localhost:7860"}).status_code == 200


def test_api_key(pipe):
    with TestClient(create_app([pipe], ServeConfig(api_key="s3cret"))) as c:
        assert c.get("/").status_code == 200  # the page itself holds nothing secret
        r = c.get("/sdapi/v1/sd-models")
        assert r.status_code == 401 and r.json()["error"] == "Unauthorized"
        assert c.post("/sdapi/v1/txt2img", json={"steps": 1}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/models", headers={"X-API-Key": "s3cret"}).status_code == 200
        basic = base64.b64encode(b"user:s3cret").decode()
        assert c.get("/v1/models", headers={"Authorization": f"Basic {basic}"}).status_code == 200


def test_img2img_and_inpainting_match_the_library(client, pipe):
    """img2img image i is reverie.editing.img2img of seed + i; inpainting keeps the black part of the mask
    exactly and repaints the white part; a strength that runs no step and an empty mask are 422s."""
    from reverie import editing
    from reverie.images import to_pil
    from reverie.sampling import SamplingOptions
    from reverie.serve.edits import to_tensor

    start = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 1, "steps": 6}).json()["images"][0]
    r = client.post("/sdapi/v1/img2img", json={"init_images": [start], "prompt": "a blue circle", "seed": 3,
                                               "denoising_strength": 0.6, "steps": 10, "batch_size": 2})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert [p["mode"] for p in info["reverie"]] == ["img2img"] * 2 and info["all_seeds"] == [3, 4]
    init = to_tensor(decode(start), 3, (32, 32))
    for i, b64 in enumerate(r.json()["images"]):
        ref = to_pil(editing.img2img(pipe, init, "a blue circle", 0.6, options=SamplingOptions(steps=10, seed=3 + i)))
        assert np.array_equal(pixels(decode(b64)), pixels(ref[0]))

    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # repaint the left half
    r = client.post("/sdapi/v1/img2img", json={"init_images": [start], "mask": png_b64(mask), "steps": 8,
                                               "prompt": "a blue square", "denoising_strength": 1.0, "seed": 2})
    assert r.status_code == 200, r.text
    before, after = pixels(decode(start)), pixels(decode(r.json()["images"][0]))
    assert np.array_equal(before[:, 16:], after[:, 16:])
    assert np.abs(before[:, :16] - after[:, :16]).mean() > 5
    assert json.loads(r.json()["info"])["reverie"][0]["mode"] == "inpaint"

    r = client.post("/sdapi/v1/img2img", json={"init_images": [start], "denoising_strength": 0.01, "steps": 10})
    assert r.status_code == 422 and "runs no step" in r.json()["detail"]
    r = client.post("/sdapi/v1/img2img", json={"init_images": [start], "mask": png_b64(Image.new("L", (32, 32), 0))})
    assert r.status_code == 422 and "empty" in r.json()["detail"]
    job = client.post("/v1/jobs/img2img", json={"init_images": [start], "steps": 4})
    assert job.status_code == 202


def test_prompt_edit_matches_the_library(client, pipe):
    """/v1/edit is reverie.editing.edit of the same image, prompts, layout and seed, byte for byte; outside the
    changed box the image is kept; bad requests are 422s."""
    from reverie import editing
    from reverie.images import to_pil
    from reverie.sampling import SamplingOptions
    from reverie.serve.edits import to_tensor

    layout = [["red circle", [0.1, 0.1, 0.45, 0.45]], ["blue square", [0.55, 0.55, 0.9, 0.9]]]
    source, target = "a red circle above a blue square", "a green circle above a blue square"
    start = client.post("/sdapi/v1/txt2img", json={"prompt": source, "seed": 1, "steps": 6,
                                                   "layout": layout}).json()["images"][0]
    body = {"init_images": [start], "from_prompt": source, "prompt": target, "seed": 5, "steps": 6, "layout": layout}
    r = client.post("/v1/edit", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])["reverie"][0]
    assert info["mode"] == "prompt_edit" and info["from_prompt"] == source and info["fresh_noise"] == 0.75
    init = to_tensor(decode(start), 3, (32, 32))
    lay = [[(p, tuple(b)) for p, b in layout]]
    ref = to_pil(editing.edit(pipe, init, source, target, SamplingOptions(steps=6, seed=5, layouts=lay).resolve(
        pipe.cfg)))[0]
    got = pixels(decode(r.json()["images"][0]))
    assert np.array_equal(got, pixels(ref))
    keep = np.ones((32, 32), bool)
    keep[1:17, 1:17] = False  # the changed box (3.2..14.4 px) grown by 2 px
    assert np.array_equal(got[keep], pixels(decode(start))[keep])
    assert client.post("/v1/edit", json={**body, "fresh_noise": 2}).status_code == 422
    assert client.post("/v1/edit", json={k: v for k, v in body.items() if k != "from_prompt"}).status_code == 422
    assert client.post("/v1/jobs/edit", json=body).status_code == 202


def _wait(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_jobs_progress_preview_and_cancel(pipe):
    with TestClient(create_app([pipe], ServeConfig())) as c:
        job = c.post("/v1/jobs/txt2img", json={"prompt": "a red circle", "steps": 1000}).json()
        assert job["state"] in ("queued", "running")
        assert _wait(lambda: c.get(f"/v1/jobs/{job['id']}").json()["step"] >= 2)
        status = c.get(f"/v1/jobs/{job['id']}").json()
        assert status["state"] == "running" and status["steps"] == 1000
        assert decode(status["preview"]).size == (256, 256)
        progress = c.get("/sdapi/v1/progress").json()
        assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 1000
        assert decode(progress["current_image"]).format == "JPEG"
        t = time.monotonic()
        r = c.delete(f"/v1/jobs/{job['id']}")
        assert r.json()["state"] == "cancelled"
        # the worker leaves the cancelled batch at its next step: a short job is served at once
        quick = c.post("/sdapi/v1/txt2img", json={"prompt": "a blue square", "steps": 2})
        assert quick.status_code == 200 and time.monotonic() - t < 10
        assert c.get(f"/v1/jobs/{job['id']}").json()["error"]["error"] == "Cancelled"
        assert c.get("/v1/jobs/0123456789abcdef").status_code == 404


def test_interrupt_stops_a_running_request(pipe):
    with TestClient(create_app([pipe], ServeConfig())) as c:
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault(
            "r", c.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 1000})))
        thread.start()
        assert _wait(lambda: c.get("/sdapi/v1/progress").json()["state"]["sampling_step"] >= 1)
        # meanwhile the event loop is free: other routes answer at once
        t = time.monotonic()
        assert c.get("/v1/health").status_code == 200 and time.monotonic() - t < 1.0
        assert c.post("/sdapi/v1/interrupt", json={}).json()["interrupted"] == 1
        thread.join(30)
        assert result["r"].status_code == 409 and result["r"].json()["error"] == "Cancelled"


def test_per_request_timeout(pipe):
    with TestClient(create_app([pipe], ServeConfig(timeout=1.0))) as c:
        t = time.monotonic()
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 1000})
        assert r.status_code == 504 and r.json()["error"] == "Timeout"
        assert time.monotonic() - t < 10
        assert c.post("/sdapi/v1/txt2img", json={"steps": 2}).status_code == 200  # the worker is free again


def test_full_queue_is_503(pipe):
    with TestClient(create_app([pipe], ServeConfig(max_queue=1))) as c:
        first = c.post("/v1/jobs/txt2img", json={"steps": 1000, "sampler_name": "euler_ancestral"}).json()
        assert _wait(lambda: c.get(f"/v1/jobs/{first['id']}").json()["state"] == "running")
        second = c.post("/v1/jobs/txt2img", json={"steps": 1000})
        assert second.status_code == 202
        third = c.post("/v1/jobs/txt2img", json={"steps": 1000})
        assert third.status_code == 503 and third.json()["error"] == "Busy"
        for job in (first, second.json()):
            c.delete(f"/v1/jobs/{job['id']}")


def test_cli_security_messages(capsys):
    import socket

    from reverie.cli.common import UserError
    from reverie.cli.serve import check_port, is_loopback, warn_public

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    warn_public("0.0.0.0", has_key=False)
    assert "WITHOUT an API key" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(UserError, match="cannot listen"):
            check_port("127.0.0.1", busy.getsockname()[1])


def test_a_client_that_goes_away_frees_the_worker(pipe):
    """Over a real socket (uvicorn in a thread): a client that gives up cancels its request."""
    import socket

    import httpx
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app([pipe], ServeConfig())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        assert _wait(lambda: server.started, 30)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 1000}, timeout=2.0)
        worker = app.state.server.workers[pipe.name]
        assert _wait(lambda: not worker.running, 10), "the abandoned request still holds the worker"
        assert worker.last.error.kind == "Cancelled" and worker.last.step < 1000
    finally:
        server.should_exit = True
        thread.join(15)


def test_png_info_reads_a_returned_image(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a yellow star", "seed": 9, "steps": 2})
    image = r.json()["images"][0]
    info = client.post("/sdapi/v1/png-info", json={"image": image}).json()["info"]
    assert "prompt: a yellow star" in info and "seed: 9" in info


def test_a_stable_diffusion_model_samples_at_the_size_asked_for(pipe, tmp_path):
    """Two models in one server; a (tiny, random) Stable Diffusion model makes width x height itself, the same
    image as the library's, and the shipped model is unaffected by the other's size."""
    pytest.importorskip("diffusers")
    from reverie.sd import set_image_size
    from sd_models import save_sd_pipeline

    sd = Pipeline.from_pretrained(save_sd_pipeline("tiny-sd1", tmp_path / "tiny-sd1"))
    with TestClient(create_app([pipe, sd], ServeConfig())) as c:
        names = [m["name"] for m in c.get("/v1/models").json()]
        assert names == [pipe.name, sd.name]
        r = c.post("/sdapi/v1/txt2img", json={"model": sd.name, "prompt": "a red cat", "seed": 5, "steps": 3,
                                              "width": 64, "height": 64})
        assert r.status_code == 200, r.text
        im = decode(r.json()["images"][0])
        meta = json.loads(im.text["reverie"])
        assert im.size == (64, 64) and (meta["width"], meta["height"]) == (64, 64) and "resized_to" not in meta
        wide = c.post("/sdapi/v1/txt2img", json={"model": sd.name, "prompt": "a red cat", "width": 64, "height": 40,
                                                 "steps": 2})
        assert wide.status_code == 200 and decode(wide.json()["images"][0]).size == (64, 40)
        bad = c.post("/sdapi/v1/txt2img", json={"model": sd.name, "width": 64, "height": 63})
        assert bad.status_code == 422 and "multiples of" in bad.json()["detail"]
        small = c.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2})
        assert decode(small.json()["images"][0]).size == (32, 32)
    set_image_size(sd, 64)  # the worker has stopped: the model is the library's again
    assert np.array_equal(pixels(im), pixels(library_image(sd, "a red cat", 5, steps=3)))


# -- text: POST /v1/text on the shipped masked diffusion text model ---------------------------------------------

@pytest.fixture(scope="module")
def text_client(pipe):
    with TestClient(create_app([pipe], ServeConfig(), ["shakespeare-mdlm"])) as c:
        yield c


@pytest.fixture(scope="module")
def text_lms():
    from reverie.language import TextLM

    return TextLM.load("shakespeare-mdlm"), TextLM.load("shakespeare-ar")


def test_text_equals_the_library_and_loads_lazily(text_client, text_lms):
    """A reply is reverie.language.generate_text's text for the same settings and seed (prompt, infill, and the
    edlm sampler with the model's own AR energy); the weights load on the first request, not at start-up."""
    from reverie.language import generate_text

    lm, energy = text_lms
    (listed,) = text_client.get("/v1/text/models").json()
    assert listed["name"] == "shakespeare-mdlm" and listed["context"] == 128 and not listed["loaded"]
    assert listed["samplers"] == ["ancestral", "caching", "edlm"] and listed["defaults"]["sampler"] == "edlm"
    cases = [({"prompt": "ROMEO:", "length": 48, "steps": 12, "sampler": "caching", "seed": 5},
              dict(prompt="ROMEO:", length=48, steps=12, sampler="caching", seed=5)),
             ({"prompt": "JULIET:", "length": 40, "steps": 10, "sampler": "edlm", "k": 3, "seed": 11},
              dict(prompt="JULIET:", length=40, steps=10, sampler="edlm", energy=energy, k=3, seed=11)),
             ({"infill": "To be, or [MASK*12] the question", "steps": 8, "sampler": "ancestral", "seed": 2},
              dict(infill="To be, or [MASK*12] the question", steps=8, sampler="ancestral", seed=2))]
    for body, settings in cases:
        r = text_client.post("/v1/text", json=body)
        assert r.status_code == 200, r.text
        reply = r.json()
        (expected,), _ = generate_text(lm, **settings)
        assert reply["text"] == expected
        assert text_client.post("/v1/text", json=body).json()["text"] == expected  # same seed, same text
        assert reply["parameters"]["seed"] == body["seed"] and reply["parameters"]["sampler"] == body["sampler"]
    assert reply["text"].startswith("To be, or ") and reply["text"].endswith(" the question")
    assert len(reply["text"]) == len("To be, or ") + 12 + len(" the question")
    other = text_client.post("/v1/text", json={**cases[0][0], "seed": 6}).json()["text"]
    assert other.startswith("ROMEO:") and other != text_client.post("/v1/text", json=cases[0][0]).json()["text"]
    assert text_client.get("/v1/text/models").json()[0]["loaded"]
    drawn = text_client.post("/v1/text", json={"prompt": "A", "length": 8, "steps": 2, "seed": -1}).json()
    assert 0 <= drawn["parameters"]["seed"] < 2**32 and drawn["parameters"]["sampler"] == "edlm"  # model's own
    assert drawn["parameters"]["corrector"] == 0 and drawn["corrector_acceptance"] is None


def test_text_corrector_is_the_library_s_towards_the_model_s_energy(text_client, text_lms):
    """corrector sweeps: Metropolis-Hastings towards the model's own AR energy (generate-text --corrector with
    the shipped pair), the same text as the library for the same seed; the job counts steps + sweeps."""
    from reverie.language import generate_text

    lm, energy = text_lms
    listed = text_client.get("/v1/text/models").json()[0]["defaults"]
    assert listed["corrector"] == 0 and listed["corrector_block"] == 6
    body = {"infill": "To be, or [MASK*12] the question", "steps": 6, "sampler": "caching", "seed": 3,
            "corrector": 2, "corrector_block": 4}
    reply = text_client.post("/v1/text", json=body).json()
    (expected,), stats = generate_text(lm, infill=body["infill"], steps=6, sampler="caching", energy=energy, seed=3,
                                       corrector=2, corrector_block=4)
    assert reply["text"] == expected and stats.proposals > 0
    assert reply["corrector_acceptance"] == pytest.approx(stats.accepted / stats.proposals)
    assert reply["parameters"]["energy"] == "../shakespeare-ar" and reply["parameters"]["corrector_block"] == 4
    (plain,), _ = generate_text(lm, infill=body["infill"], steps=6, sampler="caching", seed=3)
    assert reply["energy_rows"] > 0 and expected != plain  # (this seed: 2 of 7 block moves kept)
    job = text_client.post("/v1/jobs/text", json=body).json()
    assert _wait(lambda: text_client.get(f"/v1/jobs/{job['id']}").json()["state"] == "done")
    status = text_client.get(f"/v1/jobs/{job['id']}").json()
    assert status["steps"] == 6 + 2 and status["step"] == 8 and status["result"]["text"] == expected


def test_text_job_route_polls_to_the_same_text(text_client):
    body = {"prompt": "KING:", "length": 32, "steps": 6, "sampler": "caching", "seed": 9}
    job = text_client.post("/v1/jobs/text", json=body)
    assert job.status_code == 202
    for _ in range(200):
        status = text_client.get(f"/v1/jobs/{job.json()['id']}").json()
        if status["state"] == "done":
            break
        time.sleep(0.05)
    assert status["state"] == "done" and status["steps"] == 6
    assert status["result"]["text"] == text_client.post("/v1/text", json=body).json()["text"]


@pytest.mark.parametrize("body,words", [
    ({"sampler": "euler"}, "unknown text sampler 'euler'"),
    ({"sampler": "EDLM"}, "choose one of ancestral, caching, edlm"),
    ({"length": 129}, "at most the model's context, 128"),
    ({"length": 5000}, "less than or equal to 4096"),
    ({"length": 0}, "greater than or equal to 1"),
    ({"steps": 0}, "greater than or equal to 1"),
    ({"steps": 1001}, "less than or equal to 1000"),
    ({"steps": "20"}, "valid integer"),
    ({"k": 17}, "less than or equal to 16"),
    ({"corrector": 65}, "less than or equal to 64"),
    ({"corrector": -1}, "greater than or equal to 0"),
    ({"corrector_block": 0}, "greater than or equal to 1"),
    ({"seed": -2}, "greater than or equal to -1"),
    ({"prompt": "x" * 40, "length": 40}, "not shorter than length 40"),
    ({"prompt": "x" * 2001}, "at most 2000 characters"),
    ({"infill": "no span here"}, "needs masked spans"),
    ({"infill": "a [MASK*0] b"}, "needs masked spans"),
    ({"infill": "[MASK*" + "9" * 1900 + "]"}, "more than the model's context of 128"),
    ({"infill": "a [MASK*120] " + "b" * 10}, "more than the model's context of 128"),
    ({"infill": "a [MASK]", "prompt": "b"}, "give no prompt"),
    ({"infill": "a [MASK]", "length": 20}, "give no length"),
    ({"model": "shapes-t2i"}, "no text model 'shapes-t2i' is loaded"),
    ({"model": "../../etc"}, "no text model"),
    ({"temperature": 2}, "extra inputs are not permitted"),
])
def test_text_bounds_are_4xx_json(text_client, body, words):
    r = text_client.post("/v1/text", json=body)
    assert r.status_code == 422 and r.json()["error"] in ("InvalidRequest", "UnknownModel"), r.text
    assert words.lower() in r.json()["detail"].lower(), r.json()["detail"]


def test_text_without_a_text_model_is_404(client):
    r = client.post("/v1/text", json={"prompt": "a"})
    assert r.status_code == 404 and r.json()["error"] == "NoTextModel"
    assert client.get("/v1/text/models").json() == []


def test_text_runs_on_its_worker_with_timeout_and_cancel(pipe):
    """A long text request times out at its step callback (504) while the event loop keeps answering, a queued
    one can be cancelled, and the worker is free again afterwards."""
    with TestClient(create_app([pipe], ServeConfig(timeout=1.5), ["shakespeare-mdlm"])) as c:
        long = {"prompt": "A", "length": 128, "steps": 1000, "sampler": "ancestral", "seed": 0}
        running = c.post("/v1/jobs/text", json=long).json()
        assert _wait(lambda: c.get(f"/v1/jobs/{running['id']}").json()["state"] == "running")
        assert c.get("/v1/health").status_code == 200  # the loop answers while the text job samples:
        assert c.get(f"/v1/jobs/{running['id']}").json()["state"] == "running"
        queued = c.post("/v1/jobs/text", json=long).json()
        assert c.delete(f"/v1/jobs/{queued['id']}").json()["state"] == "cancelled"
        t = time.monotonic()
        r = c.post("/v1/text", json=long)
        assert r.status_code == 504 and r.json()["error"] == "Timeout" and time.monotonic() - t < 10
        assert c.get(f"/v1/jobs/{running['id']}").json()["state"] in ("cancelled", "done")
        ok = c.post("/v1/text", json={"prompt": "A", "length": 8, "steps": 2, "sampler": "caching"})
        assert ok.status_code == 200 and ok.json()["text"].startswith("A")


def test_cli_serve_takes_text_model_directories(monkeypatch, capsys):
    """`reverie serve --model TEXT_DIR` serves it beside the shipped image model; an AR model is one line."""
    import uvicorn

    from reverie.cli import main
    from reverie.language import ASSETS

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    assert main(["serve", "--port", "0", "--model", str(ASSETS / "shakespeare-mdlm")]) == 0
    server = apps[0].state.server
    assert list(server.pipes) == ["shapes-t2i"] and list(server.text) == ["shakespeare-mdlm"]
    assert not server.text["shakespeare-mdlm"].describe(True)["loaded"]  # weights wait for the first request
    server.close()
    assert main(["serve", "--port", "0", "--model", "shakespeare-ar"]) == 2
    assert "is an AR text model" in capsys.readouterr().err
