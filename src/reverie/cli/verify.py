"""``reverie verify FILE``: the C2PA manifest, its signature, whether the pixels still match, and both
watermarks (``reverie.provenance.verify``)."""

from __future__ import annotations

import json
from pathlib import Path

from .common import DEFAULT_MODEL


def add_commands(sub, fmt) -> None:
    v = sub.add_parser("verify", help="check an image's Content Credentials and watermarks", formatter_class=fmt,
                       description="Report the C2PA manifest (made by a generative model? which one?), whether its "
                                   "signature is valid and trusted, whether the decoded pixels are the signed ones, "
                                   "and whether the pixel and Tree-Ring watermarks of your key are present.")
    v.add_argument("file", help="image (PNG) or sound (WAV) to check")
    v.add_argument("--model", default=None,
                   help="model directory for the Tree-Ring check (default: the model the file names, if it is the "
                        "shipped one)")
    v.add_argument("--no-tree-ring", action="store_true", help="skip the Tree-Ring check (it inverts the image)")
    v.add_argument("--trust", default=None, help="PEM file of trust anchors for C2PA (default: the local CA)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=verify)


def _model_for(args, path: Path):
    from ..pipeline import Pipeline
    from ..provenance import read_png_parameters

    if args.no_tree_ring:
        return None
    if args.model:
        return Pipeline.from_pretrained(args.model)
    try:
        named = read_png_parameters(path).get("model")
    except ValueError:
        named = None
    return Pipeline.from_pretrained(DEFAULT_MODEL) if named == DEFAULT_MODEL.name else None


def verify(args) -> int:
    """Exit status 0 when the manifest is present and valid and the pixels match, 1 otherwise."""
    from ..provenance.verify import verify_image, verify_wav

    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    anchors = Path(args.trust).read_bytes() if args.trust else None
    if path.read_bytes()[:4] == b"RIFF":  # a WAV from generate-audio
        report = verify_wav(path, anchors=anchors)
    else:
        report = verify_image(path, model=_model_for(args, path), anchors=anchors)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        print(f"{path}:")
        for line in report.lines():
            print(f"  {line}")
    c = report.checks
    authentic = all(c[k].ok for k in ("c2pa manifest", "c2pa signature", "pixels match manifest",
                                      "samples match manifest") if k in c)
    return 0 if authentic and "c2pa signature" in c else 1
