"""``reverie serve``: the local page and the AUTOMATIC1111-compatible API (``reverie.serve``)."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

from .common import DEFAULT_MODEL, UserError, at_least, number_in

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def add_commands(sub, fmt) -> None:
    s = sub.add_parser("serve", help="serve a web page and an A1111-compatible API for models", formatter_class=fmt,
                       description="Load the models once and serve the page at http://HOST:PORT/ and the API "
                                   "(/sdapi/v1/txt2img, ...; described at /docs). Binds to 127.0.0.1: only this "
                                   "machine can connect. To serve a network, pass --host 0.0.0.0 with --api-key.")
    s.add_argument("--model", action="append", default=None,
                   help="image or text model directory to serve (repeatable; the first of each kind is its "
                        "default; a kind left out gets its shipped model: shapes-t2i, shakespeare-mdlm)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    s.add_argument("--port", type=at_least(0), default=7860, help="port (0: any free one)")
    s.add_argument("--api-key", default=None,  # not the environment's value here: --help would print it
                   help="key every API request must send (Authorization: Bearer KEY); default: $REVERIE_API_KEY")
    s.add_argument("--timeout", type=number_in(1, 3600), default=120.0,
                   help="seconds a request may take, waiting in the queue included")
    s.add_argument("--max-batch", type=at_least(1), default=16, help="images sampled at once per model")
    s.add_argument("--max-queue", type=at_least(1), default=64, help="requests waiting per model before 503")
    s.add_argument("--no-batching", action="store_true", help="run each request alone (for comparison)")
    s.add_argument("--no-watermark", action="store_true",
                   help="no Tree-Ring watermark in the start noise and no pixel watermark (each PNG says so; it is "
                        "still signed)")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile each image model's network (the first request per batch size compiles)")
    s.set_defaults(func=serve)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> int:
    """The port to serve on (a free one for 0), or a one-line error now, rather than uvicorn's log lines later,
    when the address cannot be bound."""
    if port > 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        return sock.getsockname()[1]


def warn_public(host: str, has_key: bool) -> None:
    if has_key:
        print(f"reverie serve: listening on {host}, beyond this machine; every API request needs the API key",
              file=sys.stderr)
        return
    bar = "!" * 78
    print(f"{bar}\nreverie serve: WARNING: listening on {host} WITHOUT an API key.\n"
          f"Anyone who can reach this machine can generate images on it and fill its queue.\n"
          f"Pass --api-key KEY (or set REVERIE_API_KEY) to require a key, or bind to 127.0.0.1.\n{bar}",
          file=sys.stderr)


def serve(args) -> int:
    from ..optional import require

    uvicorn = require("uvicorn", "reverie serve")
    require("fastapi", "reverie serve")
    from ..pipeline import Pipeline
    from ..serve import ServeConfig, create_app
    from ..serve.text import TextModel
    from .text import DEFAULT_TEXT_MODEL, is_text_model

    port = check_port(args.host, args.port)
    api_key = args.api_key or os.environ.get("REVERIE_API_KEY") or None
    loopback = is_loopback(args.host)
    if not loopback:
        warn_public(args.host, bool(api_key))
    given = args.model or []
    texts = [TextModel(m, device=args.device)  # its config now, its weights on first use
             for m in [m for m in given if is_text_model(m)] or [DEFAULT_TEXT_MODEL]]
    paths = [Path(m) for m in given if not is_text_model(m)] or [DEFAULT_MODEL]
    pipes = [Pipeline.from_pretrained(p, device=args.device, compile=args.compile) for p in paths]
    config = ServeConfig(api_key=api_key, allowed_hosts=LOOPBACK_NAMES if loopback else None,
                         timeout=args.timeout, max_batch=args.max_batch, max_queue=args.max_queue,
                         batching=not args.no_batching, watermark=not args.no_watermark)
    app = create_app(pipes, config, texts)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    names = [p.name for p in pipes] + [t.name for t in texts]
    print(f"reverie serve: {', '.join(names)} at http://{shown}:{port}/ "
          f"(API at /sdapi/v1 and /v1, described at /docs); Ctrl+C stops it", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=port, log_level="warning", limit_concurrency=512,
                timeout_graceful_shutdown=5)
    return 0
