"""A fuzz test of the server: 300 malformed requests (wrong types, out-of-range numbers, broken JSON, wrong
content types and methods, junk images, odd paths, bad text requests), each answered with a 4xx JSON error
naming the problem, never a 500; afterwards the server still generates."""

from __future__ import annotations

import base64
import json
import random

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from reverie.cli.common import DEFAULT_MODEL  # noqa: E402
from reverie.pipeline import Pipeline  # noqa: E402
from reverie.serve import ServeConfig, create_app  # noqa: E402

N = 300
FIELDS = ["prompt", "negative_prompt", "steps", "cfg_scale", "sampler_name", "scheduler", "seed", "batch_size",
          "n_iter", "width", "height", "model", "guidance_rescale", "layout", "grid", "override_settings",
          "send_images"]
# values that are wrong for the field they are put in (each field has its own invalid set)
BAD = {
    "prompt": [None, 5, ["a"], {"a": 1}, "x" * 2500, True],
    "negative_prompt": [7, [], "y" * 3000, False],
    "steps": [0, -1, 10**9, 2.5, "20", None, [], float("nan"), True],
    "cfg_scale": [-1, 1e6, "4", [4], {}, True],
    "sampler_name": [3, "nope", "../../x", "\u0000", ["euler"]],  # "": the model's own, as in A1111
    "scheduler": [1, "nope", {}],
    "seed": [-2, 2**70, 1.5, "1", [], True],
    "batch_size": [0, 17, 1000, -3, "2", 2.0, None],
    "n_iter": [0, 17, "1", 1.5],
    "width": [0, 7, 10**6, "512", -64],
    "height": [1, 5000, "x", []],
    "model": ["../../etc/passwd", "/etc/shadow", "no-such-model", 42, ["shapes-t2i"], "C:\\\\windows"],
    "guidance_rescale": [-0.1, 1.5, "0", []],
    "layout": ["everywhere", 3, [["x"]], [["x", [0, 0, 2, 2]]], [["x", [0.5, 0.5, 0.1, 0.1]]], [[1, [0, 0, 1, 1]]],
               [["x", [0, 0, 1]]], [["x", [0, 0, 1, float("nan")]]]],
    "grid": ["nope", [1.0], [1.0, 2.0, 0.0], [1.0, 0.5], [-1.0, 0.0], ["a", 0], 5, [1e9, 0.0]],
    "override_settings": [{"sd_model_checkpoint": "/etc/passwd"}, {"sd_model_checkpoint": "../x"}, "str", 5],
    "send_images": ["yes", 2, None],
}
ROUTES = ["/sdapi/v1/txt2img", "/v1/jobs/txt2img", "/sdapi/v1/img2img"]
RAW_BODIES = [b"", b"{", b"[", b"null", b"42", b'"text"', b"[1, 2, 3]", b"{'single': 'quotes'}", b"\xff\xfe\x00",
              b'{"prompt": "a", "prompt": 5}', b"[" * 5000 + b"]" * 5000, b'{"a": ' * 3000 + b"1" + b"}" * 3000,
              b'{"steps": NaN}', b'{"cfg_scale": Infinity}', b'{"steps": 1e400}', b"\x00" * 100]
JUNK_IMAGES = ["", "!!", "aGVsbG8=", "data:image/png;base64,AAAA", "http://127.0.0.1/x.png", "file:///etc/passwd",
               base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40).decode(), "data:text/plain,hello", 5, None, [],
               "A" * 1001]
# POST /v1/text bodies, each wrong in one way (the model is the shipped shakespeare-mdlm, context 128)
BAD_TEXT = [{"sampler": "nope"}, {"sampler": 3}, {"length": 0}, {"length": 129}, {"length": 10**9}, {"steps": 0},
            {"steps": 10**6}, {"k": 0}, {"seed": "1"}, {"prompt": "x" * 200}, {"prompt": ["a"]}, {"model": "../x"},
            {"infill": "[MASK*" + "9" * 1500 + "]"}, {"infill": "[MASK*99999999999]"}, {"infill": "none"},
            {"infill": "[MASK*0]"}, {"infill": "a [MASK]", "prompt": "b"}, {"infill": None, "extra": 1},
            {"length": 2.5}, {"steps": float("nan")}, {"corrector": 10**6}, {"corrector_block": -3},
            {"corrector": "8"}]


def malformed(rng: random.Random):
    """(method, path, raw body or None, json body or None, headers) of one malformed request."""
    kind = rng.randrange(7)
    route = rng.choice(ROUTES)
    if kind == 0:  # one to three fields with wrong values, among valid ones
        body = {"prompt": "a red circle", "steps": 2}
        for field in rng.sample(FIELDS, rng.randint(1, 3)):
            body[field] = rng.choice(BAD[field])
        if route.endswith("img2img"):
            body["init_images"] = [rng.choice(JUNK_IMAGES[:8])]
        return "POST", route, None, body, {}
    if kind == 1:  # broken or hostile JSON
        return "POST", route, rng.choice(RAW_BODIES), None, {"content-type": "application/json"}
    if kind == 2:  # wrong content type
        ctype = rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""])
        return "POST", route, b'{"prompt": "a"}', None, {"content-type": ctype}
    if kind == 3:  # img2img with junk images or masks
        body = {"init_images": [rng.choice(JUNK_IMAGES)]} if rng.random() < 0.7 else \
               {"init_images": rng.choice([[], "notalist", None, {}])}
        if rng.random() < 0.5:
            body["mask"] = rng.choice(JUNK_IMAGES)
        return "POST", "/sdapi/v1/img2img", None, body, {}
    if kind == 4:  # wrong methods and unknown or odd paths
        method, path = rng.choice([("GET", "/sdapi/v1/txt2img"), ("PUT", "/sdapi/v1/options"),
                                   ("DELETE", "/sdapi/v1/progress"), ("GET", "/sdapi/v1/nothing"),
                                   ("GET", "/static/../../etc/passwd"), ("GET", "/static/%2e%2e/%2e%2e/etc/passwd"),
                                   ("GET", "/v1/jobs/" + "x" * 300), ("DELETE", "/v1/jobs/nope"),
                                   ("GET", "/static/nope.js"), ("POST", "/v1/health")])
        return method, path, b"{}" if method in ("POST", "PUT") else None, None, {"content-type": "application/json"}
    if kind == 5:  # the other JSON routes
        path, body = rng.choice([("/sdapi/v1/options", {"sd_model_checkpoint": rng.choice(BAD["model"])}),
                                 ("/v1/layout", {"prompt": rng.choice(BAD["prompt"])}),
                                 ("/v1/layout", {"prompt": "a", "seed": -1}),
                                 ("/v1/layout", {"prompt": "a", "extra": 1}),
                                 ("/sdapi/v1/png-info", {"image": rng.choice(JUNK_IMAGES)}),
                                 ("/sdapi/v1/progress?skip_current_image=maybe", None),
                                 ("/v1/text", rng.choice(BAD_TEXT)), ("/v1/jobs/text", rng.choice(BAD_TEXT))])
        return ("GET" if body is None else "POST"), path, None, body, {}
    # kind 6: valid JSON of the wrong shape
    return "POST", route, None, rng.choice([[], [1], "s", 3, None, {"prompt": {"nested": [1]}}, {"steps": {}}]), {}


@pytest.fixture(scope="module")
def client():
    pipe = Pipeline.from_pretrained(DEFAULT_MODEL)
    with TestClient(create_app([pipe], ServeConfig(max_body_bytes=1_000_000), ["shakespeare-mdlm"]),
                    raise_server_exceptions=False) as c:
        yield c


def test_malformed_requests_get_4xx_json_and_the_server_keeps_serving(client):
    rng = random.Random(2024)
    statuses = {}
    for i in range(N):
        method, path, raw, body, headers = malformed(rng)
        kwargs = {"headers": headers}
        if raw is not None:
            kwargs["content"] = raw
        elif body is not None:
            kwargs["content"] = json.dumps(body, allow_nan=True).encode()
            kwargs["headers"] = {"content-type": "application/json", **headers}
        r = client.request(method, path, **kwargs)
        assert 400 <= r.status_code < 500, (i, method, path, raw or body, r.status_code, r.text[:300])
        payload = r.json()
        assert isinstance(payload.get("error"), str) and isinstance(payload.get("detail"), str), payload
        assert "Traceback" not in r.text
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    assert sum(statuses.values()) == N and len(statuses) >= 5  # 400, 404, 405, 413/415, 422, ... all exercised
    ok = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2})
    assert ok.status_code == 200 and len(ok.json()["images"]) == 1
    text = client.post("/v1/text", json={"prompt": "A", "length": 16, "steps": 2, "sampler": "caching"})
    assert text.status_code == 200 and text.json()["text"].startswith("A")
