"""The one WAV writer of generated audio, and the reader of its parameters.

A generated clip is a mono 16-bit PCM WAV whose parameters travel inside the file, in a RIFF ``LIST``
chunk of type ``INFO`` (the standard place for text in a WAV): ``ICMT`` (comment) holds the parameters
as JSON (what :func:`read_wav_parameters` and ``reverie generate-audio --from-wav`` read), ``INAM``
(title) the prompt and ``ISFT`` (software) "reverie". No sidecar file. The parameters include
``audio_sha256``, the SHA-256 of the PCM samples (the ``data`` chunk's bytes), so a reader can tell
whether the sound was changed after it was written. Where c2pa-python is installed the file also gets a
signed C2PA manifest (``audio/wav``; ``reverie.provenance.credentials``), like a PNG's.
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
from pathlib import Path

import numpy as np

from . import credentials

_warned = False


def pcm16(wave) -> bytes:
    """Float samples in [-1, 1] as little-endian 16-bit PCM bytes (clipped)."""
    return (np.clip(np.asarray(wave, dtype=np.float64), -1, 1) * 32767).round().astype("<i2").tobytes()


def _chunk(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("<I", len(body)) + body + (b"\0" if len(body) % 2 else b"")


def _info_text(text: str) -> bytes:
    return text.encode("utf-8") + b"\0"


def wav_bytes(wave, sample_rate: int, params: dict) -> bytes:
    """A mono 16-bit WAV file of ``wave`` with ``params`` (plus ``audio_sha256``) in its LIST/INFO chunk."""
    data = pcm16(wave)
    params = {**params, "sample_rate": int(sample_rate), "audio_sha256": hashlib.sha256(data).hexdigest()}
    fmt = struct.pack("<HHIIHH", 1, 1, int(sample_rate), int(sample_rate) * 2, 2, 16)
    info = b"INFO" + _chunk(b"INAM", _info_text(str(params.get("prompt", "")))) \
        + _chunk(b"ISFT", _info_text("reverie")) + _chunk(b"ICMT", _info_text(json.dumps(params, sort_keys=True)))
    body = b"WAVE" + _chunk(b"fmt ", fmt) + _chunk(b"data", data) + _chunk(b"LIST", info)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def riff_chunks(data: bytes) -> dict[bytes, bytes]:
    """The top-level chunks of a RIFF/WAVE file (the last of each tag), and ``INFO:xxxx`` entries of LIST/INFO."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a WAV file")
    chunks, pos = {}, 12
    while pos + 8 <= len(data):
        tag, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        chunks[tag] = body
        if tag == b"LIST" and body[:4] == b"INFO":
            sub = 4
            while sub + 8 <= len(body):
                name, n = body[sub:sub + 4], struct.unpack("<I", body[sub + 4:sub + 8])[0]
                chunks[b"INFO:" + name] = body[sub + 8:sub + 8 + n]
                sub += 8 + n + (n & 1)
        pos += 8 + size + (size & 1)
    return chunks


def save_wav(wave, sample_rate: int, path: Path, params: dict, *, sign: bool = True) -> dict:
    """Write ``wave`` to ``path`` with its generation parameters (and a C2PA manifest when ``sign`` and
    c2pa-python is installed); returns the parameters as written."""
    global _warned
    data = wav_bytes(wave, sample_rate, params)
    written = json.loads(riff_chunks(data)[b"INFO:ICMT"].rstrip(b"\0"))
    if sign and credentials.c2pa_module() is not None:
        manifest = credentials.manifest_for(written, written["audio_sha256"], Path(path).name, fmt="audio/wav",
                                            content_key="audio_sha256")
        data = credentials.sign_png(data, manifest, mime="audio/wav")
    elif sign and not _warned:
        _warned = True
        warnings.warn('c2pa-python is not installed: WAVs are saved without Content Credentials '
                      '(pip install "reverie[provenance]")', stacklevel=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return written


def read_wav_parameters(src: Path, check: bool = True) -> dict:
    """The generation parameters of a WAV written by :func:`save_wav`; with ``check``, a file whose samples no
    longer match ``audio_sha256`` is an error. Missing, foreign or damaged files are one-line errors."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"{src} not found")
    try:
        chunks = riff_chunks(src.read_bytes())
    except ValueError:
        raise ValueError(f"{src} is not a WAV file") from None
    meta = chunks.get(b"INFO:ICMT")
    if not meta:
        raise ValueError(f"{src} carries no reverie generation parameters")
    try:
        params = json.loads(meta.rstrip(b"\0").decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{src}: its reverie parameters are not valid JSON") from None
    if not isinstance(params, dict):
        raise ValueError(f"{src}: its reverie parameters are not a JSON object")
    if check and params.get("audio_sha256") != hashlib.sha256(chunks.get(b"data", b"")).hexdigest():
        raise ValueError(f"{src}: the samples do not match the audio_sha256 it carries (changed after it was made)")
    return params
