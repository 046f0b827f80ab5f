"""``speech``: spoken digits ("zero" .. "nine") synthesized by espeak-ng, one second at 8 kHz.

This is formant speech: eSpeak NG's rule-based synthesizer over English voices (US, British, Scottish,
RP, Caribbean, ...), its male and female variants, pitches and speeds. It has little of real speech's
diversity: it proves that the audio pipeline learns words, not that it makes realistic voices. No
speech corpus ships in a PyPI wheel (SC09, FSDD, yesno and ESC-50 do not), so the clips are made here.

``reverie data speech`` renders the clips once (``make_speech_cache``: espeak-ng's 22.05 kHz WAV on
stdout, resampled to 8 kHz with a polyphase filter, trimmed of silence, the word placed 50 ms in and
peak-normalized) into ``$REVERIE_CACHE/speech`` (default ``~/.cache/reverie/speech``); sox is not
needed. Only rendering needs espeak-ng; the dataset reads the cache. Clips come in rounds of one per
digit; every fifth round is ``test``.

Items: ``{"image": [1, n_mels, frames] log-mel in [-1, 1], "text": "seven, female voice", "label": 7}``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..audio import MelSpec

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
          "en-us-nyc")
VARIANTS = tuple(f"m{k}" for k in range(1, 8)) + tuple(f"f{k}" for k in range(1, 6))
SAMPLE_RATE = 8000
CACHE_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("REVERIE_CACHE", Path.home() / ".cache" / "reverie")) / "speech"


def cache_path(per_word: int, seed: int) -> Path:
    return cache_dir() / f"digits-v{CACHE_VERSION}-{per_word}x{len(WORDS)}-seed{seed}.npz"


def caption(word: str, variant: str) -> str:
    return f"{word}, {'female' if variant.startswith('f') else 'male'} voice"


def parse_wav_bytes(data: bytes) -> tuple[np.ndarray, int]:
    """Samples (float32) and rate of a 16-bit mono WAV held in memory. espeak-ng writes its header before it
    knows the length (the sizes read 0x7FFFFFFF or so), so the data chunk is taken to the end of the bytes."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a WAV stream")
    pos, rate, width = 12, None, None
    while pos + 8 <= len(data):
        tag, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if tag == b"fmt ":
            rate = int.from_bytes(data[pos + 12:pos + 16], "little")
            width = int.from_bytes(data[pos + 22:pos + 24], "little")
        if tag == b"data":
            if rate is None or width != 16:
                raise ValueError("expected a 16-bit PCM WAV stream")
            body = data[pos + 8:]
            body = body[: len(body) // 2 * 2]
            return np.frombuffer(body, dtype="<i2").astype(np.float32) / 32768, rate
        pos += 8 + size + (size & 1)
    raise ValueError("no data chunk in the WAV stream")


def place(wave: np.ndarray, num_samples: int, lead: float = 0.05, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The active part of ``wave`` (samples above 2% of the peak, with 10 ms margins) placed ``lead`` seconds
    into a clip of ``num_samples``, cut at the end if longer, peak-normalized to 0.7."""
    peak = float(np.abs(wave).max()) if len(wave) else 0.0
    out = np.zeros(num_samples, dtype=np.float32)
    if peak == 0:
        return out
    active = np.nonzero(np.abs(wave) > 0.02 * peak)[0]
    margin = int(0.01 * sample_rate)
    word = wave[max(0, active[0] - margin): active[-1] + margin]
    start = int(lead * sample_rate)
    word = word[: num_samples - start]
    out[start:start + len(word)] = word / peak * 0.7
    return out


def synthesize(word: str, voice: str, variant: str, pitch: int, speed: int, num_samples: int = SAMPLE_RATE,
               espeak: str = "espeak-ng") -> np.ndarray:
    """One clip of ``word`` by espeak-ng, at 8 kHz (see :func:`place`)."""
    from scipy.signal import resample_poly

    out = subprocess.run([espeak, "-v", f"{voice}+{variant}", "-s", str(speed), "-p", str(pitch), "--stdout", word],
                         capture_output=True, check=True, timeout=30)
    wave, rate = parse_wav_bytes(out.stdout)
    if rate != SAMPLE_RATE:
        g = np.gcd(rate, SAMPLE_RATE)
        wave = resample_poly(wave, SAMPLE_RATE // g, rate // g).astype(np.float32)
    return place(wave, num_samples)


def make_speech_cache(per_word: int = 200, seed: int = 0, progress: bool = True) -> Path:
    """Render ``per_word`` clips of each digit over random voices, variants, pitches (20..80) and speeds
    (120..220 words per minute) into the cache; returns its path (kept if it exists)."""
    path = cache_path(per_word, seed)
    if path.is_file():
        return path
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise FileNotFoundError("espeak-ng is not installed (apt-get install espeak-ng): it renders the speech clips")
    rng = random.Random(seed)
    waves, labels, meta = [], [], []
    jobs = [(w, k) for k in range(per_word) for w in range(len(WORDS))]
    for w, _ in tqdm(jobs, desc="espeak-ng", disable=not progress):
        voice, variant = rng.choice(VOICES), rng.choice(VARIANTS)
        pitch, speed = rng.randint(20, 80), rng.randint(120, 220)
        wave = synthesize(WORDS[w], voice, variant, pitch, speed, espeak=espeak)
        waves.append(np.round(wave * 32767).astype(np.int16))
        labels.append(w)
        meta.append({"voice": voice, "variant": variant, "pitch": pitch, "speed": speed})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, waves=np.stack(waves), labels=np.array(labels, dtype=np.int64),
                        meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    tmp.replace(path)
    return path


def load_speech_cache(path: Path) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    with np.load(path, allow_pickle=False) as f:
        return f["waves"].astype(np.float32) / 32767, f["labels"], json.loads(bytes(f["meta"]).decode())


class SpeechDataset(Dataset):
    """Spoken digits from the espeak-ng cache (see the module docstring); ``split``: train | test | all
    (every fifth round of ten words is test). ``path``: a cache file (default: the one ``reverie data speech``
    writes for ``per_word`` and ``seed``)."""

    num_classes = len(WORDS)

    def __init__(self, resolution: int = 64, split: str = "train", per_word: int = 200, seed: int = 0,
                 path: str | None = None):
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be train, test or all, got {split!r}")
        source = Path(path) if path else cache_path(per_word, seed)
        if not source.is_file():
            raise FileNotFoundError(f"no speech clips at {source}: render them once with `reverie data speech "
                                    f"--per-word {per_word} --seed {seed}` (needs espeak-ng)")
        waves, labels, meta = load_speech_cache(source)
        # clips come in rounds of one per word: every fifth round is test, so both splits hold every word
        keep = [i for i in range(len(labels)) if split == "all" or (i // len(WORDS) % 5 == 4) == (split == "test")]
        self.waves, self.labels = waves[keep], labels[keep]
        self.meta = [meta[i] for i in keep]
        self.mel = MelSpec(sample_rate=SAMPLE_RATE, n_mels=resolution, frames=resolution,
                           hop=round(SAMPLE_RATE / resolution))
        self.images = torch.cat([self.mel.encode(torch.from_numpy(self.waves[a:a + 256]))
                                 for a in range(0, len(keep), 256)]).to(torch.bfloat16) if keep else None

    def audio_info(self) -> dict:
        return {"kind": "mel", "mel": self.mel.to_dict(), "dataset": "speech"}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        word = int(self.labels[index])
        return {"image": self.images[index].float(), "text": caption(WORDS[word], self.meta[index]["variant"]),
                "label": word}

