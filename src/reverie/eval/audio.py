"""Judging generated sound: note accuracy by pitch tracking, and a spoken-digit classifier's view of speech.

Notes (``sounds``): a clip made for a caption is scored against the caption's own notes
(``reverie.data.sounds.SoundSpec.notes``). A single note or an arpeggio note is right when YIN
(``reverie.audio.pitch_of``) on its time span gives the caption's MIDI note within half a semitone
(octave included). A chord's three notes sound together, which a one-pitch tracker cannot separate: each
chord note is right when its pitch class is among the three strongest of the clip's chroma
(``reverie.audio.chroma``). Drum patterns have no notes and are not scored here.

Speech (``speech``): :class:`DigitClassifier`, a small CNN on log-mel images trained on real clips; its
accuracy on generated clips (after Griffin-Lim, re-analysed from the waveform, as a listener would get
them) against its accuracy on real held-out clips, and the Fréchet distance between its penultimate
features on real and generated clips (as FID does with Inception's; ``reverie.eval.fid.frechet_distance``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..audio import MelSpec, chroma, pitch_of
from ..data.sounds import SoundSpec
from .fid import frechet_distance


def note_results(wave: np.ndarray, spec: SoundSpec, sample_rate: int) -> list[dict]:
    """Per-note verdicts ``{"midi", "found", "right"}`` of one clip against its caption's notes."""
    notes = spec.notes()
    if spec.kind == "chord":
        a, b = int(notes[0][1] * sample_rate), int(notes[0][2] * sample_rate)
        energy = chroma(wave[a:b], sample_rate)
        top = set(np.argsort(energy)[-3:].tolist()) if energy.sum() > 0 else set()
        return [{"midi": m, "found": None, "right": m % 12 in top} for m, _, _ in notes]
    out = []
    for midi, onset, offset in notes:
        found = pitch_of(wave, sample_rate, onset, offset)
        out.append({"midi": midi, "found": None if np.isnan(found) else round(found, 2),
                    "right": bool(np.isfinite(found) and abs(found - midi) < 0.5)})
    return out


def note_accuracy(waves, specs: list[SoundSpec], sample_rate: int) -> dict:
    """Share of notes right over clips (see the module docstring), overall and per kind; and, a diagnostic
    that ignores the absolute pitch, the share of arpeggio steps (note to next note) whose interval is right
    within half a semitone."""
    per_kind: dict[str, list[bool]] = {}
    steps = []
    for wave, spec in zip(waves, specs):
        results = note_results(np.asarray(wave), spec, sample_rate)
        for r in results:
            per_kind.setdefault(spec.kind, []).append(r["right"])
        if spec.kind == "arpeggio":
            for a, b in zip(results, results[1:]):
                ok = a["found"] is not None and b["found"] is not None
                steps.append(ok and abs((b["found"] - a["found"]) - (b["midi"] - a["midi"])) < 0.5)
    every = [v for vs in per_kind.values() for v in vs]
    return {"note_accuracy": float(np.mean(every)) if every else float("nan"), "notes": len(every),
            "per_kind": {k: {"accuracy": float(np.mean(v)), "notes": len(v)} for k, v in sorted(per_kind.items())},
            "arpeggio_interval_accuracy": float(np.mean(steps)) if steps else float("nan")}


class DigitClassifier(nn.Module):
    """A small CNN over ``[B, 1, 64, 64]`` log-mel images: three conv-BN-ReLU-pool stages, global average
    pooling to a 64-d feature (the Fréchet distance's space), a linear layer to the classes."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        layers, ch = [], 1
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(ch, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            ch = out
        self.body = nn.Sequential(*layers, nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.head = nn.Linear(ch, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 15, seed: int = 0,
                     batch_size: int = 64, lr: float = 3e-3) -> DigitClassifier:
    """Fit :class:`DigitClassifier` on real clips, with random time shifts of up to 8 frames (a word's start
    varies)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier(int(labels.max()) + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(1, steps))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=g)
        for k in range(len(images) // batch_size):
            idx = order[k * batch_size:(k + 1) * batch_size]
            shift = int(torch.randint(-8, 9, (1,), generator=g))
            x = torch.roll(images[idx].float(), shift, dims=-1)
            loss = nn.functional.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def classify(model: DigitClassifier, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels, features) of images."""
    preds, feats = [], []
    for a in range(0, len(images), batch_size):
        f = model.features(images[a:a + batch_size].float())
        feats.append(f)
        preds.append(model.head(f).argmax(-1))
    return torch.cat(preds), torch.cat(feats)


def feature_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets."""
    def stats(f):
        f = f.double()
        return f.mean(0), torch.cov(f.T)

    return frechet_distance(*stats(real), *stats(fake))


def reanalyse(mel: MelSpec, waves) -> torch.Tensor:
    """Waveforms -> log-mel images: what a listener of the WAV gets, not the sampler's raw image."""
    return mel.encode(torch.as_tensor(np.asarray(waves)))
