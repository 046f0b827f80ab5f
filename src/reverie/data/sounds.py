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
Items are pure functions of ``(seed, index)``.

Spectrogram: by default (``scale="log"``) the rows are log-frequency, one semitone each at resolution 64,
centered on MIDI 40 to 103 (82 Hz to 2.5 kHz; ``LOG_RANGE_MIDI``), so that every note of the set sits on a
row and a change of pitch is a shift along the rows (``reverie.audio``); ``scale="mel"`` gives the
earlier 40 Hz to 4 kHz mel rows, on which the notes (262 to 988 Hz) fall between rows 8 and 30, at
1.8 semitones a row at C4.

Layouts (``reverie.layout``): ``ds[i]["layout"]`` is the clip as a piano roll, one ``(phrase, box)`` per
note, its box spanning the note's time (x) and its fundamental's row (y, the band half a row either side
of the row of its frequency; y grows with frequency here, as the image's row index does); a drum hit's
box spans its 0.22 s and every row. :func:`plan_sound_layout` is the planner: it reads a caption back
(:func:`parse_caption`), draws what the caption leaves open (root, quality, direction, speed, drums),
and lays the notes out on the default spectrogram, so a layout model is told at which rows and times the
notes sound, as the shapes model is told where its objects go. The caption of an item is drawn first; captions whose
hash falls in the held-out tenth (:func:`is_held_out`) appear only in ``split="test"``, so evaluation
asks the model for captions it never heard. ``ds[i]["image"]`` is the clip's log-mel image
(``reverie.audio.MelSpec``); ``ds.wave(i)`` the waveform. Images of a dataset are computed once and
kept in memory, 64 at a time as they are first read (the trainer reads each item many times).
"""

from __future__ import annotations

import hashlib
import random
import re
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
LOG_RANGE_MIDI = (39.5, 103.5)           # the log spectrogram's edges: rows centered on MIDI 40 .. 103
DRUM_SECONDS = 0.22


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
        return self.describe()

    def describe(self, root: bool = True, speed: bool = True) -> str:
        """The caption; ``root=False`` / ``speed=False`` leave the root / an arpeggio's speed out ("a falling
        minor arpeggio on a square wave"), as a user might."""
        name, sound = (NOTE_NAMES[self.root] + " " if root else ""), TIMBRE_WORDS.get(self.timbre, "")
        if self.kind == "note":
            return f"a single {name}note on {sound}"
        if self.kind == "chord":
            return f"a {name}{self.quality} chord on {sound}"
        if self.kind == "arpeggio":
            return f"a {self.direction} {name}{self.quality} arpeggio on {sound}" + (f", {self.speed}" if speed else "")
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
        b = min(num_samples, a + int(DRUM_SECONDS * sample_rate))
        out[a:b] += drum(name, sample_rate, b - a, rng)
    peak = np.abs(out).max()
    return (out / peak * rng.uniform(0.4, 0.8)).astype(np.float32) if peak > 0 else out.astype(np.float32)


Box = tuple[float, float, float, float]


def spec_layout(spec: SoundSpec, mel: MelSpec) -> list[tuple[str, Box]]:
    """The clip as a ``reverie.layout`` layout on ``mel``'s image (see the module docstring): per note
    ``("C sharp on a square wave", (onset, y0, offset, y1))`` in fractions of the clip and of the rows."""
    out = []
    for midi, onset, offset in spec.notes():
        row = float(mel.row(midi_to_hz(midi)))
        y0, y1 = row / mel.n_mels, (row + 1) / mel.n_mels
        out.append((f"{NOTE_NAMES[midi % 12]} on {TIMBRE_WORDS[spec.timbre]}",
                    (onset / mel.seconds, y0, min(offset / mel.seconds, 1.0), y1)))
    for name, onset in spec.hits():
        out.append((f"a {name} drum", (onset / mel.seconds, 0.0, min((onset + DRUM_SECONDS) / mel.seconds, 1.0), 1.0)))
    return out


_ROOT = re.compile(r"\b(?:([A-G])|([b-g]))(?:\s+(sharp|flat)|(#))?(?=\s+(?:major|minor|note|chord|arpeggio)\b)")


def parse_caption(text: str) -> dict | None:
    """What a caption says of a clip: ``{"kind", "root", "quality", "direction", "speed", "timbre", "pattern"}``
    with None for what it leaves open, or None when it names no kind (note, chord, arpeggio, drums). The root
    is a letter right before "major", "minor", "note", "chord" or "arpeggio", optionally with "sharp" or
    "flat"; a lowercase "a" there is read as the article, not the note A."""
    low = text.lower()
    kind = next((k for k, words in (("drums", ("drum", "kick", "snare")), ("arpeggio", ("arpeggio",)),
                                    ("chord", ("chord",)), ("note", ("note",))) if any(w in low for w in words)), None)
    if kind is None:
        return None
    root = None
    m = _ROOT.search(text)
    if m:
        root = "C D EF G A B".index((m.group(1) or m.group(2)).upper())
        root = (root + {"sharp": 1, "#": 1, "flat": -1}.get(m.group(3) or m.group(4), 0)) % 12

    def word(options: dict):
        return next((v for k, v in options.items() if re.search(rf"\b{k}", low)), None)

    return {"kind": kind, "root": root, "quality": word({"minor": "minor", "major": "major"}),
            "direction": word({"falling": "falling", "descending": "falling", "down": "falling",
                               "rising": "rising", "ascending": "rising", "up": "rising"}),
            "speed": word({"fast": "fast", "quick": "fast", "slow": "slow"}),
            "timbre": word({"sine": "sine", "square": "square", "pluck": "pluck", "string": "pluck"}),
            "pattern": tuple(re.findall(r"\b(kick|snare|hat)", low))[:4]}


def plan_sound(text: str, rng: random.Random) -> SoundSpec | None:
    """The clip a caption asks for, what it leaves open drawn from ``rng``; None when it names no kind."""
    parsed = parse_caption(text)
    if parsed is None:
        return None
    if parsed["kind"] == "drums":
        pattern = parsed["pattern"] + tuple(rng.choice(DRUMS) for _ in range(4 - len(parsed["pattern"])))
        return SoundSpec("drums", pattern=pattern)

    def pick(key, options):
        return parsed[key] if parsed[key] is not None else rng.choice(options)

    return SoundSpec(parsed["kind"], pick("root", range(12)), pick("quality", list(QUALITIES)),
                     pick("direction", ["rising", "falling"]), pick("speed", list(SPEEDS)), pick("timbre", TIMBRES))


def plan_sound_layout(text: str, rng: random.Random, mel: MelSpec | None = None):
    """A ``reverie.layout`` planner for ``sounds`` captions: the notes of :func:`plan_sound` laid out on ``mel``
    (default: the dataset's default spectrogram); None when the caption names no kind."""
    spec = plan_sound(text, rng)
    return None if spec is None else spec_layout(spec, mel or default_spectrogram())


def default_spectrogram(resolution: int = 64, sample_rate: int = 8000, scale: str = "log") -> MelSpec:
    """The spectrogram of :class:`SoundsDataset` (see the module docstring)."""
    hop = round(sample_rate / resolution)
    if scale == "mel":
        return MelSpec(sample_rate=sample_rate, n_mels=resolution, frames=resolution, hop=hop)
    fmin, fmax = (float(midi_to_hz(m)) for m in LOG_RANGE_MIDI)
    return MelSpec(sample_rate=sample_rate, n_mels=resolution, frames=resolution, hop=hop, fmin=fmin, fmax=fmax,
                   scale="log")


class SoundsDataset(Dataset):
    """Captioned one-second clips: ``{"image": [1, n_mels, frames] in [-1, 1], "text", "label": kind index,
    "layout"}``; ``split`` is ``train`` (captions outside the held-out tenth), ``test`` (held-out captions only)
    or ``all``. ``resolution`` is the spectrogram's rows and frames (a square image); ``scale`` its frequency
    rows, ``log`` or ``mel`` (the module docstring); ``vague`` the share of captions that leave words out
    (:meth:`caption`)."""

    num_classes = len(KINDS)

    def __init__(self, resolution: int = 64, split: str = "train", length: int = 8000, seed: int = 0,
                 sample_rate: int = 8000, kinds=None, timbres=None, scale: str = "log", vague: float = 0.0):
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be train, test or all, got {split!r}")
        kinds = tuple(kinds or KINDS)
        timbres = tuple(timbres or TIMBRES)
        for name, chosen, valid in (("kinds", kinds, KINDS), ("timbres", timbres, TIMBRES)):
            if not chosen or set(chosen) - set(valid):
                raise ValueError(f"unknown {name} {sorted(set(chosen) - set(valid))}; valid: {', '.join(valid)}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if not 0 <= vague <= 1:
            raise ValueError(f"vague must be in [0, 1], got {vague}")
        self.vague = vague
        if scale not in ("log", "mel"):
            raise ValueError(f"scale must be log or mel, got {scale!r}")
        self.mel = default_spectrogram(resolution, sample_rate, scale)
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
        return {"image": image.float(), "text": self.caption(index), "label": KINDS.index(spec.kind),
                "layout": spec_layout(spec, self.mel)}

    def caption(self, index: int) -> str:
        """Item ``index``'s caption: with probability ``vague`` it leaves out the root, the speed or both (the
        layout still holds them), so that a layout model learns to take what the caption does not say from
        the roll."""
        rng = random.Random(f"sounds.vague/{self.seed}/{index}")
        spec = self.spec(index)
        if rng.random() >= self.vague:
            return spec.caption
        drop = rng.randrange(3)  # 0: the root, 1: the speed, 2: both
        return spec.describe(root=drop == 1, speed=drop == 0)
