"""The page in a real browser: headless Debian chromium driven by Playwright, against `reverie serve` started
as a user would start it. It types a prompt, clicks Generate, waits for the image, checks that the image
decodes, that its parameters are the ones asked for and that it is the library's image for them; then a new
seed gives a different image, "reuse parameters" fills the form, a server error shows as a message, and a
mask painted with the mouse over an image inpaints only there; the Text tab generates the library's text.

Needs Debian's ``chromium`` (``scripts/install_optional.sh``, as ``.ci/run`` runs it) and the ``playwright``
package; without either the test is skipped with a reason that names what is missing.

``python tests/test_browser.py docs/serve_page.png`` writes the README's screenshot of the page.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROMPT = "a red circle above a blue square"


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright; it is in reverie[dev])"
    if CHROMIUM is None:
        return ("Debian's chromium is not installed: no 'chromium' on PATH (.ci/run installs it, "
                "i.e. apt-get install -y chromium)")
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"browser test skipped: {_missing()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(*extra: str):
    """``reverie serve`` in a subprocess on a free port; yields its base URL once /v1/health answers."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "reverie", "serve", "--port", str(port), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"reverie serve exited with {proc.returncode}: {proc.stdout.read().decode()}")
            try:
                with urllib.request.urlopen(url + "/v1/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("reverie serve did not answer within 90 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def browser_page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 860})
            yield page
        finally:
            browser.close()


def set_value(page, selector: str, value) -> None:
    """Set an input (range inputs included) the way a user's change does: value, then an input event."""
    page.eval_on_selector(selector, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", str(value))


def generate(page, count_before: int) -> dict:
    page.click("#generate")
    page.wait_for_function(f"document.querySelectorAll('#gallery figure.item').length > {count_before}",
                           timeout=60_000)
    figure = page.query_selector("#gallery figure.item")  # the newest comes first
    src = figure.query_selector("img").get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    image.load()
    return {"image": image, "shown": json.loads(figure.get_attribute("data-params"))}


def test_page_generates_in_a_real_browser():
    from PIL import Image  # noqa: F401

    from reverie.cli.common import DEFAULT_MODEL
    from reverie.pipeline import Pipeline
    from reverie.provenance import watermark_noise

    with running_server() as url, browser_page() as page:
        page.goto(url + "/")
        page.wait_for_function("document.querySelectorAll('#sampler option').length > 0")
        assert page.input_value("#model") == "shapes-t2i"
        page.fill("#prompt", PROMPT)
        page.fill("#seed", "123")
        page.fill("#count", "1")
        set_value(page, "#steps", 40)
        first = generate(page, 0)
        im, shown = first["image"], first["shown"]
        assert im.format == "PNG" and im.size == (32, 32)
        stored = json.loads(im.text["reverie"])
        for params in (stored, shown):
            assert params["prompt"] == PROMPT and params["seed"] == 123 and params["steps"] == 40
            assert params["sampler"] == "dpmpp_2m" and params["guidance"] == 4.0 and params["model"] == "shapes-t2i"
        assert page.get_attribute("#preview", "src").startswith("data:image/jpeg;base64,")  # the live preview ran
        assert "123" in page.inner_text("#gallery figure.item figcaption")
        pipe = Pipeline.from_pretrained(DEFAULT_MODEL)
        ref = pipe.generate(PROMPT, 1, steps=40, seed=123, noise=watermark_noise(pipe, 1, 123)[0])[0]
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(ref))

        page.fill("#seed", "124")
        second = generate(page, 1)
        assert second["shown"]["seed"] == 124
        diff = np.abs(np.asarray(second["image"].convert("RGB"), int) - np.asarray(im.convert("RGB"), int))
        assert diff.mean() > 2, "a new seed must give a different image"

        page.click("#gallery figure.item:nth-child(2) .reuse")  # the first image's parameters back in the form
        assert page.input_value("#seed") == "123" and page.input_value("#prompt") == PROMPT
        assert page.input_value("#steps") == "40"

        # an error from the server is a message on the page, not a stack trace
        page.eval_on_selector("#model", "el => { el.add(new Option('gone', 'gone')); el.value = 'gone'; }")
        page.click("#generate")
        page.wait_for_selector("#error:not(.hidden)", timeout=10_000)
        message = page.inner_text("#error")
        assert "no model 'gone' is loaded" in message and "Traceback" not in message

        # inpainting: "edit" on the first image, paint over its left part, generate
        page.eval_on_selector("#model", "el => { el.value = 'shapes-t2i'; }")
        page.click("#gallery figure.item:nth-child(2) .edit")
        page.wait_for_selector("#edit-tools:not(.hidden)")
        page.wait_for_function("window.scrollY === 0")  # "reuse parameters" scrolls (smoothly) to the form
        canvas = page.query_selector("#mask-canvas")
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()
        page.mouse.move(box["x"] + 30, box["y"] + 20)
        page.mouse.down()
        page.mouse.move(box["x"] + 40, box["y"] + 230, steps=12)
        page.mouse.up()
        set_value(page, "#strength", 1)
        third = generate(page, 2)
        assert third["shown"]["mode"] == "inpaint" and third["shown"]["seed"] == 123
        kept = np.asarray(third["image"].convert("RGB"), int)[:, 16:]
        assert np.array_equal(kept, np.asarray(im.convert("RGB"), int)[:, 16:])  # the unpainted half is kept
        assert not np.array_equal(np.asarray(third["image"].convert("RGB")), np.asarray(im.convert("RGB")))

        page.click("#tab-text")  # the Text tab: the shipped text model, loaded by default, generates once
        page.wait_for_function("document.querySelectorAll('#text-sampler option').length > 0")
        assert page.input_value("#text-model") == "shakespeare-mdlm" and page.is_hidden("#images-panel")
        page.fill("#text-prompt", "ROMEO:")
        page.fill("#text-length", "40")
        page.fill("#text-steps", "8")
        page.fill("#text-seed", "7")
        page.select_option("#text-sampler", "caching")
        page.click("#text-generate")
        page.wait_for_selector("#texts figure.text-item", timeout=60_000)
        shown = json.loads(page.get_attribute("#texts figure.text-item", "data-params"))
        assert shown["seed"] == 7 and shown["steps"] == 8 and shown["sampler"] == "caching" and shown["length"] == 40
        from reverie.language import TextLM, generate_text

        (expected,), _ = generate_text(TextLM.load("shakespeare-mdlm"), "ROMEO:", 40, 8, "caching", seed=7)
        assert page.inner_text("#texts figure.text-item pre") == expected
        page.fill("#text-infill", "To be, or [MASK*12] the question")  # an infill with corrector sweeps
        page.fill("#text-corrector", "2")
        page.fill("#text-block", "4")
        page.click("#text-generate")
        page.wait_for_function("document.querySelectorAll('#texts figure.text-item').length >= 2", timeout=60_000)
        shown = json.loads(page.get_attribute("#texts figure.text-item", "data-params"))
        assert shown["corrector"] == 2 and shown["corrector_block"] == 4 and shown["energy"] == "../shakespeare-ar"
        assert "2 corrector sweeps (blocks of 4, towards ../shakespeare-ar)" in \
            page.inner_text("#texts figure.text-item figcaption")
        (infilled,), _ = generate_text(TextLM.load("shakespeare-mdlm"), infill="To be, or [MASK*12] the question",
                                       steps=8, sampler="caching", seed=7, energy=TextLM.load("shakespeare-ar"),
                                       corrector=2, corrector_block=4)
        assert page.inner_text("#texts figure.text-item pre") == infilled


def screenshot(path: str) -> None:
    """The README's picture: the page after two generations, with a preview and a gallery."""
    with running_server() as url, browser_page() as page:
        page.goto(url + "/")
        page.wait_for_function("document.querySelectorAll('#sampler option').length > 0")
        for prompt, seed in (("a white ring to the left of an orange diamond", 3), (PROMPT, 7)):
            page.fill("#prompt", prompt)
            page.fill("#seed", str(seed))
            page.fill("#count", "4")
            count = len(page.query_selector_all("#gallery figure.item"))
            page.click("#generate")
            page.wait_for_function(f"document.querySelectorAll('#gallery figure.item').length >= {count + 4}",
                                   timeout=60_000)
        page.click("#gallery figure.item:nth-child(5) .edit")  # the inpainting panel, with a stroke painted
        page.wait_for_selector("#edit-tools:not(.hidden)")
        page.wait_for_function("window.scrollY === 0")
        box = page.query_selector("#mask-canvas").bounding_box()
        set_value(page, "#brush", 40)
        page.mouse.move(box["x"] + 180, box["y"] + 95)  # over the diamond
        page.mouse.down()
        page.mouse.move(box["x"] + 200, box["y"] + 135, steps=10)
        page.mouse.up()
        page.fill("#prompt", "a white ring to the left of a green diamond")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=path, full_page=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    if _missing():
        sys.exit(_missing())
    screenshot(sys.argv[1] if len(sys.argv) > 1 else "docs/serve_page.png")
