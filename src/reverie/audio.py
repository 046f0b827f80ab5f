"""Audio signal processing: log-mel spectrograms as images, Griffin-Lim inversion, YIN pitch tracking.

reverie's audio models are image diffusion models on log-mel spectrograms (``MelSpec``): a clip of
``frames * hop`` samples becomes a ``[1, n_mels, frames]`` image in [-1, 1] (magnitude in dB,
``db_range`` below full scale mapped to -1), and a generated image goes back to a waveform by
inverting the mel filterbank (least squares, clamped at 0) and recovering a phase with the fast
Griffin-Lim algorithm (Griffin & Lim 1984, with the momentum of Perraudin, Balazs & Søndergaard 2013,
alpha = 0.99). The STFT is normalized by the window's sum, so a sinusoid of amplitude A peaks at A/2.

Pitch: YIN (de Cheveigné & Kawahara 2002): the cumulative-mean-normalized difference function
d'(tau) (eq. 8), the first dip under ``threshold`` (step 4), refined by parabolic interpolation (step
5). MIDI note numbers: ``69 + 12 log2(f / 440)``.

Frequency rows (``MelSpec.scale``): ``"mel"``, triangular filters with centers equally spaced in mel
(edges ``fmin`` and ``fmax``); or ``"log"``, centers equally spaced in log frequency, row ``r`` centered at
``fmin (fmax / fmin) ** ((r + 0.5) / n_mels)``, each filter reaching to its neighbours' centers and at least
one FFT bin either side (rows narrower than a bin interpolate the spectrum). On the log scale a pitch
change is a shift along the rows and a note's harmonics keep fixed row offsets (``12 log2 k`` semitones
for the k-th), which a convolutional network learns once for every pitch; with ``fmin``/``fmax`` half a
semitone outside MIDI notes and one row per semitone, every equal-tempered note sits on a row's center.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch


def hz_to_mel(f):
    """Mel scale of O'Shaughnessy (HTK): 2595 log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def midi_to_hz(note) -> float | np.ndarray:
    return 440.0 * 2.0 ** ((np.asarray(note, dtype=np.float64) - 69.0) / 12.0)


def hz_to_midi(f) -> np.ndarray:
    return 69.0 + 12.0 * np.log2(np.asarray(f, dtype=np.float64) / 440.0)


def log_centers(n_rows: int, fmin: float, fmax: float, offset: float = 0.5) -> np.ndarray:
    """Centers (Hz) of log-frequency rows ``r + offset - 0.5`` for ``r`` in ``range(n_rows)``."""
    return fmin * (fmax / fmin) ** ((np.arange(n_rows) + offset) / n_rows)


def log_filterbank(sample_rate: int, n_fft: int, n_rows: int, fmin: float, fmax: float) -> np.ndarray:
    """Triangular filters ``[n_rows, n_fft // 2 + 1]`` with peak 1 at log-spaced centers (see the module
    docstring), each at least one FFT bin wide on either side so that no row is empty."""
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    bin_hz = sample_rate / n_fft
    center = log_centers(n_rows, fmin, fmax)[:, None]
    lo = np.minimum(log_centers(n_rows, fmin, fmax, offset=-0.5)[:, None], center - bin_hz)
    hi = np.maximum(log_centers(n_rows, fmin, fmax, offset=1.5)[:, None], center + bin_hz)
    rise = (freqs[None] - lo) / (center - lo)
    fall = (hi - freqs[None]) / (hi - center)
    return np.clip(np.minimum(rise, fall), 0, None).astype(np.float32)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Triangular filters ``[n_mels, n_fft // 2 + 1]`` with peak 1, centers equally spaced in mel."""
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lo, center, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rise = (freqs[None] - lo) / (center - lo)
    fall = (hi - freqs[None]) / (hi - center)
    return np.clip(np.minimum(rise, fall), 0, None).astype(np.float32)


@dataclass(frozen=True)
class MelSpec:
    """A log-mel spectrogram image of a fixed-length clip, and its inverse (see the module docstring)."""

    sample_rate: int = 8000
    n_fft: int = 512
    hop: int = 125
    n_mels: int = 64
    frames: int = 64
    fmin: float = 40.0
    fmax: float = 4000.0
    db_range: float = 80.0
    scale: str = "mel"   # frequency rows: "mel" or "log" (see the module docstring)

    def __post_init__(self):
        if self.scale not in ("mel", "log"):
            raise ValueError(f"scale must be 'mel' or 'log', got {self.scale!r}")
        if not 0 < self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError(f"need 0 < fmin < fmax <= sample_rate / 2, got fmin={self.fmin}, fmax={self.fmax}")

    @property
    def num_samples(self) -> int:
        return self.frames * self.hop

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MelSpec:
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown spectrogram setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        return cls(**d)

    def filters(self) -> torch.Tensor:
        bank = log_filterbank if self.scale == "log" else mel_filterbank
        return torch.from_numpy(bank(self.sample_rate, self.n_fft, self.n_mels, self.fmin, self.fmax))

    def centers(self) -> np.ndarray:
        """Each row's center frequency (Hz), lowest first (row 0 is the image's first row)."""
        if self.scale == "log":
            return log_centers(self.n_mels, self.fmin, self.fmax)
        return mel_to_hz(np.linspace(hz_to_mel(self.fmin), hz_to_mel(self.fmax), self.n_mels + 2))[1:-1]

    def row(self, freq) -> np.ndarray:
        """The fractional row index whose center is at ``freq`` Hz (inverse of :meth:`centers`)."""
        if self.scale == "log":
            octaves = np.log2(np.asarray(freq, dtype=np.float64) / self.fmin) / np.log2(self.fmax / self.fmin)
            return self.n_mels * octaves - 0.5
        lo, hi = hz_to_mel(self.fmin), hz_to_mel(self.fmax)
        return (hz_to_mel(freq) - lo) / (hi - lo) * (self.n_mels + 1) - 1

    def _window(self) -> torch.Tensor:
        return torch.hann_window(self.n_fft, dtype=torch.float64)

    def stft(self, wave: torch.Tensor) -> torch.Tensor:
        """Complex STFT ``[..., n_fft/2 + 1, frames]`` of ``[..., num_samples]`` (centered, window-sum normalized)."""
        window = self._window().to(wave.device)
        spec = torch.stft(wave.double(), self.n_fft, self.hop, window=window, center=True, return_complex=True)
        return spec[..., :self.frames] / window.sum()

    def istft(self, spec: torch.Tensor) -> torch.Tensor:
        window = self._window().to(spec.device)
        full = torch.cat([spec, spec[..., -1:] * 0], dim=-1) * window.sum()  # the dropped last frame: silence
        return torch.istft(full, self.n_fft, self.hop, window=window, center=True, length=self.num_samples)

    def encode(self, wave) -> torch.Tensor:
        """``[..., num_samples]`` waveform(s) -> ``[..., 1, n_mels, frames]`` float32 images in [-1, 1]."""
        wave = torch.as_tensor(np.asarray(wave) if not isinstance(wave, torch.Tensor) else wave)
        wave = _fit_length(wave, self.num_samples)
        mag = self.stft(wave).abs().float()
        mel = torch.einsum("mf,...ft->...mt", self.filters(), mag)
        db = 20 * torch.log10(mel.clamp_min(10 ** (-self.db_range / 20)))
        return (db / (self.db_range / 2) + 1).clamp(-1, 1).unsqueeze(-3)

    def mel_magnitude(self, image: torch.Tensor) -> torch.Tensor:
        """Images ``[..., 1, n_mels, frames]`` -> mel magnitudes ``[..., n_mels, frames]`` (silence below the range)."""
        db = (image.squeeze(-3).float().clamp(-1, 1) - 1) * (self.db_range / 2)
        mag = 10 ** (db / 20)
        return torch.where(image.squeeze(-3) <= -1 + 1e-4, torch.zeros_like(mag), mag)

    def linear_magnitude(self, image: torch.Tensor, iters: int = 30) -> torch.Tensor:
        """The non-negative linear spectrogram whose mel projection best matches the image (projected
        gradient on ||F s - m||^2 from the pseudo-inverse, clamped at 0)."""
        F = self.filters().double()
        mel = self.mel_magnitude(image).double()
        s = (torch.linalg.pinv(F) @ mel).clamp_min(0)
        step = 1.0 / float(torch.linalg.matrix_norm(F, 2) ** 2)
        for _ in range(iters):
            s = (s - step * (F.T @ (F @ s - mel))).clamp_min(0)
        return s

    def decode(self, image: torch.Tensor, iters: int = 64, seed: int = 0, momentum: float = 0.99) -> torch.Tensor:
        """Images ``[..., 1, n_mels, frames]`` -> float32 waveforms ``[..., num_samples]`` (fast Griffin-Lim from a
        seeded random phase)."""
        mag = self.linear_magnitude(image)
        g = torch.Generator().manual_seed(seed)
        phase = torch.rand(mag.shape, generator=g, dtype=torch.float64) * (2 * math.pi)
        spec = mag * torch.exp(1j * phase)
        previous = spec
        for _ in range(iters):
            projected = self.stft(self.istft(spec))
            spec_new = projected + momentum * (projected - previous)
            previous = projected
            spec = mag * torch.exp(1j * torch.angle(spec_new))
        return self.istft(spec).float()


def _fit_length(wave: torch.Tensor, n: int) -> torch.Tensor:
    if wave.shape[-1] >= n:
        return wave[..., :n]
    return torch.nn.functional.pad(wave, (0, n - wave.shape[-1]))


def yin(wave: np.ndarray, sample_rate: int, fmin: float = 60.0, fmax: float = 1100.0,
        threshold: float = 0.15) -> tuple[float, float]:
    """The fundamental frequency of a frame by YIN, and its aperiodicity d'(tau) (lower: more periodic).
    ``(nan, 1.0)`` when the frame is too short or silent."""
    x = np.asarray(wave, dtype=np.float64)
    tau_max = int(sample_rate / fmin)
    tau_min = max(2, int(sample_rate / fmax))
    w = len(x) - tau_max
    if w < tau_max // 2 or not np.any(x):
        return float("nan"), 1.0
    # d(tau) = sum_j (x_j - x_{j+tau})^2 over a window of w samples (eq. 6)
    energy = np.cumsum(np.concatenate([[0.0], x * x]))
    frames = np.lib.stride_tricks.sliding_window_view(x, w)[: tau_max + 1]
    d = energy[w] + (energy[np.arange(tau_max + 1) + w] - energy[np.arange(tau_max + 1)]) - 2 * frames @ x[:w]
    cmnd = np.ones_like(d)
    cmnd[1:] = d[1:] * np.arange(1, tau_max + 1) / np.maximum(np.cumsum(d[1:]), 1e-12)
    below = np.nonzero(cmnd[tau_min:] < threshold)[0]
    if len(below):
        tau = tau_min + below[0]
        while tau + 1 <= tau_max and cmnd[tau + 1] < cmnd[tau]:
            tau += 1
    else:
        tau = tau_min + int(np.argmin(cmnd[tau_min:]))
    if 1 <= tau < tau_max:  # parabolic interpolation of d(tau) around the dip (step 5)
        a, b, c = d[tau - 1], d[tau], d[tau + 1]
        denom = a - 2 * b + c
        shift = 0.5 * (a - c) / denom if abs(denom) > 1e-12 else 0.0
    else:
        shift = 0.0
    return sample_rate / (tau + float(np.clip(shift, -1, 1))), float(cmnd[tau])


def pitch_of(wave: np.ndarray, sample_rate: int, start: float, end: float, **options) -> float:
    """The MIDI note (fractional) of ``wave`` between ``start`` and ``end`` seconds by YIN on the segment's
    middle, or nan."""
    a, b = int(start * sample_rate), int(end * sample_rate)
    length = b - a
    lo = a + length // 8  # skip the attack transient
    f0, _ = yin(wave[lo:b], sample_rate, **options)
    return float(hz_to_midi(f0)) if np.isfinite(f0) else float("nan")


def chroma(wave: np.ndarray, sample_rate: int, fmin: float = 100.0, fmax: float = 2000.0) -> np.ndarray:
    """Energy per pitch class (12, C = 0) of the magnitude spectrum between ``fmin`` and ``fmax``."""
    x = np.asarray(wave, dtype=np.float64)
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / sample_rate)
    keep = (freqs >= fmin) & (freqs <= fmax)
    classes = np.round(hz_to_midi(freqs[keep])).astype(int) % 12
    return np.bincount(classes, weights=spec[keep], minlength=12)


def write_wav_pcm16(path, wave: np.ndarray, sample_rate: int) -> None:
    """A mono 16-bit PCM WAV file (no metadata; ``reverie.provenance.wav`` adds it)."""
    import wave as wavmod

    pcm = (np.clip(np.asarray(wave, dtype=np.float64), -1, 1) * 32767).round().astype("<i2")
    with wavmod.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(pcm.tobytes())


def read_wav(path) -> tuple[np.ndarray, int]:
    """A PCM WAV file's samples as float32 in [-1, 1] (channels averaged) and its sample rate."""
    import wave as wavmod

    with wavmod.open(str(path), "rb") as f:
        width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
        raw = f.readframes(f.getnframes())
    if width == 1:
        data = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        data = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768
    elif width == 4:
        data = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 2**31
    else:
        raise ValueError(f"{path}: {8 * width}-bit PCM is not supported (8, 16 or 32-bit)")
    return data.reshape(-1, channels).mean(axis=1), rate
