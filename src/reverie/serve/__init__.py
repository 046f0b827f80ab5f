"""``reverie serve``: a local web page and an AUTOMATIC1111-compatible HTTP API around loaded models.

- ``app.py``: the FastAPI application (``create_app``), its routes and the guard in front of them
  (Host header, body size, JSON-only bodies, API key).
- ``worker.py``: one queue and one worker thread per model; batching of requests with the same
  settings, progress and previews, cancel, per-request timeouts.
- ``text.py``: ``POST /v1/text`` on a masked diffusion text model (``reverie.language``): its own queue
  and thread, the weights loaded on the first request.
- ``schemas.py``: request bodies and their bounds. ``images.py``: bounded image decoding; PNGs through
  the shared writer.
- ``static/``: the one page (HTML, JS, CSS; no build step, nothing from a CDN) and an offline API page.

Why FastAPI with one static page, not gradio: gradio is a large dependency (its own frontend bundle,
many transitive packages) and has a history of reaching out to the network when offline (CDN fonts,
telemetry, share links); reverie must work with no network at all. A plain page over a JSON API keeps
one contract for people and programs (the page uses the same routes a client does), installs with two
small packages (``pip install "reverie[serve]"``), and is tested in-process with FastAPI's TestClient.
"""

from .app import ServeConfig, create_app

__all__ = ["create_app", "ServeConfig"]
