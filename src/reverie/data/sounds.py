"""``sounds``: procedural captioned sound clips, the audio counterpart of ``shapes``.

Each clip is one second (at the spectrogram's sample rate, 8 kHz by default) of one of four kinds:

- a single note: "a single E note on a square wave";
- a chord (root, third and fifth together): "a C major chord on a sine wave";
- an arpeggio (root, third, fifth, octave, one after another): "a rising A minor arpeggio on a plucked string, fast";
- a drum pattern of four hits: "a drum pattern: kick, hat, snare, hat".

Timbres: ``sine``; ``square`` (band-limited: odd harmonics below Nyquist, amplitude 1/k); ``plucked
string`` (Karplus & Strong 1983, with the loop's fractional delay tuned exactly by a first-order allpass,
Jaffe & Smith 1983, so that every note sits on its pitch); drums are noise hits (kick: a falling sine;
snare: noise plus a tone; hat: high-passed noise). Roots are the 12 pitch classes of octave 4 (C4 = MIDI
60 = 261.6 Hz); arpeggios climb to octave 5.

Every item keeps its ground truth: ``notes`` (MIDI note, onset s, offset s) and ``hits`` (drum, onset).
Items are pure functions of ``(seed, index)``. The caption of an item is drawn first; captions whose
hash falls in the held-out tenth (:func:`is_held_out`) appear only in ``split="test"``, so evaluation
asks the model for captions it never heard. ``ds[i]["image"]`` is the clip's log-mel image
(``reverie.audio.MelSpec``); ``ds.wave(i)`` the waveform. Images of a dataset are computed once and
kept in memory, 64 at a time as they are first read (the trainer reads each item many times).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from ..audio import MelSpec, midi_to_hz

NOTE_NAMES = ("C", "C sharp", "D", "D sharp", "E", "F", "F sharp", "G", "G sharp", "A", "A sharp", "B")
TIMBRES = ("sine", "square", "pluck")
TIMBRE_WORDS = {"sine": "a sine wave", "square": "a square wave", "pluck": "a plucked string"}
QUALITIES = {"major": (0, 4, 7), "minor": (0, 3, 7)}
DRUMS = ("kick", "snare", "hat")
KINDS = ("note", "chord", "arpeggio", "drums")
SPEEDS = {"fast": 0.16, "slow": 0.24}   # seconds between arpeggio notes
ROOT_OCTAVE_MIDI = 60                    # C4
HELD_OUT_TENTHS = 1


@dataclass
class SoundSpec:
    """What a clip holds: ``kind`` and its musical parameters; ``caption`` and ground truth derive from it."""

    kind: str
    root: int = 0                 # pitch class 0..11 (C = 0)
    quality: str = "major"
    direction: str = "rising"
    speed: str = "fast"
    timbre: str = "sine"
    pattern: tuple[str, ...] = field(default_factory=tuple)   # drums

    @property
    def caption(self) -> str:
        name, sound = NOTE_NAMES[self.root], TIMBRE_WORDS.get(self.timbre, "")
        if self.kind == "note":
            return f"a single {name} note on {sound}"
        if self.kind == "chord":
            return f"a {name} {self.quality} chord on {sound}"
        if self.kind == "arpeggio":
            return f"a {self.direction} {name} {self.quality} arpeggio on {sound}, {self.speed}"
        return "a drum pattern: " + ", ".join(self.pattern)

    def notes(self, start: float = 0.02) -> list[tuple[int, float, float]]:
        """Ground-truth ``(midi, onset, offset)`` in seconds (a one-second clip)."""
        base = ROOT_OCTAVE_MIDI + self.root
        if self.kind == "note":
            return [(base, start, 0.9)]
        intervals = QUALITIES[self.quality]
        if self.kind == "chord":
            return [(base + i, start, 0.9) for i in intervals]
        if self.kind == "arpeggio":
            pitches = [base + i for i in intervals] + [base + 12]
            if self.direction == "falling":
                pitches = pitches[::-1]
            step = SPEEDS[self.speed]
            return [(p, start + k * step, start + (k + 1) * step) for k, p in enumerate(pitches)]
        return []

    def hits(self, start: float = 0.02) -> list[tuple[str, float]]:
        return [(d, start + 0.24 * k) for k, d in enumerate(self.pattern)] if self.kind == "drums" else []


def all_specs() -> list[SoundSpec]:
    """Every distinct clip description (one per caption), in a fixed order."""
    specs = []
    for timbre in TIMBRES:
        for root in range(12):
            specs.append(SoundSpec("note", root, timbre=timbre))
            for quality in QUALITIES:
                specs.append(SoundSpec("chord", root, quality, timbre=timbre))
                for direction in ("rising", "falling"):
                    for speed in SPEEDS:
                        specs.append(SoundSpec("arpeggio", root, quality, direction, speed, timbre))
    for a in DRUMS:
        for b in DRUMS:
            for c in DRUMS:
                for d in DRUMS:
                    specs.append(SoundSpec("drums", pattern=(a, b, c, d)))
    return specs


def is_held_out(caption: str) -> bool:
    """Whether a caption belongs to the held-out tenth (a fixed hash of its text)."""
    return int(hashlib.sha256(caption.encode()).hexdigest(), 16) % 10 < HELD_OUT_TENTHS


def karplus_strong(freq: float, sample_rate: int, length: int, rng: np.random.Generator, decay: float = 0.996,
                   brightness: float = 1.0) -> np.ndarray:
    """A plucked string at exactly ``freq`` Hz: noise through the loop y[n] = x[n] + decay * A(z) avg(z) y[n-N],
    where avg is the two-point average (phase delay 1/2) and A the allpass (C + z^-1) / (1 + C z^-1) whose phase
    delay at ``freq`` makes up the fractional rest of the period (C found by bisection)."""
    from scipy.signal import lfilter

    period = sample_rate / freq
    n = int(np.floor(period - 0.5 - 0.1))   # leave the allpass a delay in (0.1, 1.1)
    c = _allpass_coefficient(2 * np.pi * freq / sample_rate, period - 0.5 - n)
    burst = np.zeros(length)
    burst[:n + 1] = rng.uniform(-1, 1, n + 1)
    if brightness < 1:  # a softer pluck: low-passed excitation
        burst[:n + 1] = lfilter([brightness], [1, brightness - 1], burst[:n + 1])
    # Y (1 + C z^-1) - decay/2 (1 + z^-1)(C + z^-1) z^-N Y = X (1 + C z^-1)
    den = np.zeros(n + 3)
    den[0], den[1] = 1.0, c
    den[n] -= decay * c / 2
    den[n + 1] -= decay * (1 + c) / 2
    den[n + 2] -= decay / 2
    return lfilter([1.0, c], den, burst)


def _allpass_coefficient(omega: float, delay: float) -> float:
    """C of (C + z^-1) / (1 + C z^-1) whose phase delay at ``omega`` is ``delay`` (in (0, 2))."""
    def phase_delay(c):
        h = (c + np.exp(-1j * omega)) / (1 + c * np.exp(-1j * omega))
        return -np.angle(h) / omega

    lo, hi = -0.999, 0.999  # phase delay falls as C grows
    for _ in range(60):
        mid = (lo + hi) / 2
        if phase_delay(mid) > delay:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def tone(timbre: str, freq: float, sample_rate: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """One note of ``length`` samples (attack 5 ms, exponential decay for sine and square)."""
    t = np.arange(length) / sample_rate
    if timbre == "pluck":
        return karplus_strong(freq, sample_rate, length, rng, decay=rng.uniform(0.994, 0.999),
                              brightness=rng.uniform(0.5, 1.0))
    if timbre == "sine":
        wave = np.sin(2 * np.pi * freq * t)
    else:  # band-limited square: odd harmonics below Nyquist
        wave = sum(np.sin(2 * np.pi * k * freq * t) / k for k in range(1, int(sample_rate / 2 / freq) + 1, 2))
        wave = wave * (np.pi / 4)
    envelope = np.minimum(t / 0.005, 1.0) * np.exp(-t * rng.uniform(1.0, 3.0))
    release = np.minimum((length - np.arange(length)) / (0.01 * sample_rate), 1.0)  # no click at the end
    return wave * envelope * release


def drum(name: str, sample_rate: int, length: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.signal import lfilter

    t = np.arange(length) / sample_rate
    if name == "kick":  # a sine falling from ~150 Hz to ~50 Hz
        f = 50 + 100 * np.exp(-t * 30)
        return np.sin(2 * np.pi * np.cumsum(f) / sample_rate) * np.exp(-t * 12)
    noise = rng.uniform(-1, 1, length)
    if name == "snare":
        return (0.7 * noise + 0.5 * np.sin(2 * np.pi * 190 * t)) * np.exp(-t * 25)
    return lfilter([1, -1], [1, -0.3], noise) * 0.5 * np.exp(-t * 60)  # hat: high-passed, short


def render(spec: SoundSpec, sample_rate: int, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """The clip's waveform, peak-normalized to a random level in [0.4, 0.8]."""
    out = np.zeros(num_samples)
    for midi, onset, offset in spec.notes():
        a, b = int(onset * sample_rate), min(num_samples, int(offset * sample_rate))
        out[a:b] += tone(spec.timbre, float(midi_to_hz(midi)), sample_rate, b - a, rng)
    for name, onset in spec.hits():
        a = int(onset * sample_rate)
        b = min(num_samples, a + int(0.22 * sample_rate))
        out[a:b] += drum(name, sample_rate, b - a, rng)
    peak = np.abs(out).max()
    return (out / peak * rng.uniform(0.4, 0.8)).astype(np.float32) if peak > 0 else out.astype(np.float32)


class SoundsDataset(Dataset):
    """Captioned one-second clips: ``{"image": [1, n_mels, frames] in [-1, 1], "text", "label": kind index,
    "spec": SoundSpec}``; ``split`` is ``train`` (captions outside the held-out tenth), ``test`` (held-out
    captions only) or ``all``. ``resolution`` is the spectrogram's mel bands and frames (a square image)."""

    num_classes = len(KINDS)

    def __init__(self, resolution: int = 64, split: str = "train", length: int = 8000, seed: int = 0,
                 sample_rate: int = 8000, kinds=None, timbres=None):
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be train, test or all, got {split!r}")
        kinds = tuple(kinds or KINDS)
        timbres = tuple(timbres or TIMBRES)
        for name, chosen, valid in (("kinds", kinds, KINDS), ("timbres", timbres, TIMBRES)):
            if not chosen or set(chosen) - set(valid):
                raise ValueError(f"unknown {name} {sorted(set(chosen) - set(valid))}; valid: {', '.join(valid)}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.mel = MelSpec(sample_rate=sample_rate, n_mels=resolution, frames=resolution,
                           hop=round(sample_rate / resolution))
        self.split, self.length, self.seed = split, length, seed
        self.specs = [s for s in all_specs() if s.kind in kinds and (s.kind == "drums" or s.timbre in timbres)
                      and (split == "all" or is_held_out(s.caption) == (split == "test"))]
        self._images: dict[int, torch.Tensor] = {}

    def audio_info(self) -> dict:
        """What turns this dataset's images back into sound (stored in a model's config)."""
        return {"kind": "mel", "mel": self.mel.to_dict(), "dataset": "sounds"}

    def __len__(self) -> int:
        return self.length

    def spec(self, index: int) -> SoundSpec:
        rng = random.Random(self.seed * 1_000_003 + index)
        return self.specs[rng.randrange(len(self.specs))]

    def wave(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        return render(self.spec(index), self.mel.sample_rate, self.mel.num_samples, rng)

    def _chunk(self, k: int) -> torch.Tensor:
        """Images of items ``64 k .. 64 k + 63``, computed on first use and kept (bf16): the trainer reads each
        item many times, a preview only a few."""
        if k not in self._images:
            waves = np.stack([self.wave(i) for i in range(64 * k, min(64 * (k + 1), self.length))])
            self._images[k] = self.mel.encode(torch.from_numpy(waves)).to(torch.bfloat16)
        return self._images[k]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        spec = self.spec(index)
        image = self._chunk(index // 64)[index % 64]
        return {"image": image.float(), "text": spec.caption, "label": KINDS.index(spec.kind)}
