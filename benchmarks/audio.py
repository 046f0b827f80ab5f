"""Text-to-audio and speech, measured (issue 25's acceptance).

Sounds (``--sounds MODEL``): one clip per caption of the held-out captions of ``sounds`` (captions the model
never heard; drum patterns left out: they have no notes), and as many training captions, sampled with the
model's own settings; note accuracy by pitch tracking against each caption's notes
(``reverie.eval.audio.note_accuracy``). The ceiling: the real clips of the same captions through the
spectrogram and Griffin-Lim, scored the same way.

Speech (``--speech MODEL``, a class-conditioned model of ``speech``): a small digit classifier trained
on real clips (train split); its accuracy on the real test clips, on the test clips through the
spectrogram and Griffin-Lim (the pipeline's ceiling), and on ``--per-digit`` generated clips of each
digit; the Fréchet distance of its features, real test vs each. Target: generated accuracy >= 80% of real.

Sounds with ``--vague``: instead, prompts that leave a held-out caption's root and speed open, each clip scored against
the roll the planner drew for it.

A layout model (a piano roll per note, ``reverie.data.sounds.plan_sound_layout``) is measured with the rolls
planned from each caption (``--layouts auto``, the default) and, for comparison, without (``--layouts none``).

Generation time per second of audio: the sampler's and Griffin-Lim's wall time over one batch, divided by
the seconds of audio made.

    python benchmarks/audio.py --sounds runs/sounds/model --speech runs/speech/model
    # -> benchmarks/results/audio.json, audio_sounds.png (spectrograms of generated clips)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from reverie.data.sounds import SoundsDataset, plan_sound
from reverie.data.speech import WORDS, SpeechDataset
from reverie.eval.audio import classify, feature_distance, note_accuracy, reanalyse, train_classifier
from reverie.layout import planner_rng
from reverie.pipeline import Pipeline
from reverie.sampling import SamplingOptions
from reverie.sound import audio_spec, generate_audio, spectrogram_png

RESULTS = Path(__file__).resolve().parent / "results"


def timed_generate(pipe, batch: int, options: SamplingOptions, **kwargs):
    """generate_audio in batches of ``batch``; returns (waves, images, seconds sampling+GL)."""
    start = time.perf_counter()
    waves, images, _ = generate_audio(pipe, num_clips=batch, options=options, **kwargs)
    return waves, images, time.perf_counter() - start


def sounds_part(model: str, limit: int, seed: int, batch: int, layouts: str = "auto") -> dict:
    pipe = Pipeline.from_pretrained(model)
    mel = audio_spec(pipe)
    held = [s for s in SoundsDataset(split="test", length=1).specs if s.kind != "drums"]
    train = [s for s in SoundsDataset(split="train", length=1).specs if s.kind != "drums"]
    rng = random.Random(seed)
    held = held[:limit] if limit else held
    seen = rng.sample(train, len(held))
    out = {"model": model, "captions": {"held_out": len(held), "train": len(seen)}, "layouts": layouts}
    options = SamplingOptions(seed=seed, layouts=layouts)
    timing = {"sampling_and_griffin_lim_s": 0.0, "audio_s": 0.0}
    for name, specs in (("held_out", held), ("train", seen)):
        waves = []
        for a in range(0, len(specs), batch):
            chunk = specs[a:a + batch]
            w, images, elapsed = timed_generate(pipe, len(chunk), options, prompt=[s.caption for s in chunk])
            waves += list(w)
            timing["sampling_and_griffin_lim_s"] += elapsed
            timing["audio_s"] += len(chunk) * mel.seconds
            if name == "held_out" and a == 0 and layouts == "auto":
                spectrogram_png(images[:4], mel, RESULTS / "audio_sounds.png", [s.caption for s in chunk[:4]])
        out[name] = note_accuracy(waves, specs, mel.sample_rate)
        print(name, json.dumps(out[name]), flush=True)
    real = SoundsDataset(split="all", length=1)
    rng_np = np.random.default_rng(seed)
    from reverie.data.sounds import render

    clips = np.stack([render(s, mel.sample_rate, mel.num_samples, rng_np) for s in held])
    through = mel.decode(mel.encode(torch.from_numpy(clips)), seed=seed).numpy()
    out["ceiling_real_through_griffin_lim"] = note_accuracy(through, held, mel.sample_rate)
    out["real_clips"] = note_accuracy(clips, held, mel.sample_rate)
    del real
    out["seconds_per_audio_second"] = timing["sampling_and_griffin_lim_s"] / timing["audio_s"]
    out["sampling"] = SamplingOptions(layouts=layouts).resolve(pipe.cfg).to_metadata()
    return out


def vague_part(model: str, seed: int, batch: int) -> dict:
    """Prompts that leave the root (and an arpeggio's speed) open: each clip is scored against the clip its
    planned piano roll stands for (``plan_sound`` replayed with the generator sampling gave the planner)."""
    pipe = Pipeline.from_pretrained(model)
    mel = audio_spec(pipe)
    held = [s for s in SoundsDataset(split="test", length=1).specs if s.kind != "drums"]
    prompts = [s.describe(root=False, speed=False) for s in held]
    waves, planned = [], []
    for a in range(0, len(prompts), batch):
        chunk = prompts[a:a + batch]
        waves += list(timed_generate(pipe, len(chunk), SamplingOptions(seed=seed), prompt=chunk)[0])
        planned += [plan_sound(p, planner_rng(seed, i, p)) for i, p in enumerate(chunk)]
    out = {"model": model, "prompts": len(prompts), "examples": prompts[:3]}
    out.update(note_accuracy(waves, planned, mel.sample_rate))
    print("vague", json.dumps(out), flush=True)
    return out


def speech_part(model: str, per_digit: int, seed: int, batch: int, epochs: int) -> dict:
    train, test = SpeechDataset(split="train"), SpeechDataset(split="test")
    labels_test = torch.as_tensor(test.labels)
    start = time.perf_counter()
    clf = train_classifier(train.images.float(), torch.as_tensor(train.labels), epochs=epochs, seed=seed)
    out = {"classifier_train_s": time.perf_counter() - start, "real_train_clips": len(train),
           "real_test_clips": len(test)}
    pred, real_feats = classify(clf, test.images.float())
    out["accuracy_real"] = float((pred == labels_test).float().mean())
    through = reanalyse(test.mel, test.mel.decode(test.images.float(), seed=seed))
    pred_t, feats_t = classify(clf, through)
    out["accuracy_real_through_griffin_lim"] = float((pred_t == labels_test).float().mean())
    out["frechet_real_test_vs_real_train"] = feature_distance(real_feats, classify(clf, train.images.float())[1])
    out["frechet_real_test_vs_through_griffin_lim"] = feature_distance(real_feats, feats_t)
    if model:
        pipe = Pipeline.from_pretrained(model)
        mel = audio_spec(pipe)
        wanted = torch.arange(len(WORDS)).repeat_interleave(per_digit)
        waves, elapsed, shown = [], 0.0, {}
        for a in range(0, len(wanted), batch):
            labels = wanted[a:a + batch]
            w, images, dt = timed_generate(pipe, len(labels), SamplingOptions(seed=seed + a), class_labels=labels)
            waves += list(w)
            elapsed += dt
            for label, image in zip(labels.tolist(), images):
                shown.setdefault(label, image)
        picked = [d for d in (0, 3, 7, 9) if d in shown]
        spectrogram_png(torch.stack([shown[d] for d in picked]), mel, RESULTS / "audio_speech.png",
                        [f"generated: {WORDS[d]}" for d in picked])
        pred_g, feats_g = classify(clf, reanalyse(mel, np.stack(waves)))
        out["generated_clips"] = len(waves)
        out["accuracy_generated"] = float((pred_g == wanted).float().mean())
        out["ratio_generated_to_real"] = out["accuracy_generated"] / out["accuracy_real"]
        out["frechet_real_test_vs_generated"] = feature_distance(real_feats, feats_g)
        out["per_digit_accuracy"] = {WORDS[d]: float((pred_g[wanted == d] == d).float().mean()) for d in range(10)}
        out["seconds_per_audio_second"] = elapsed / (len(waves) * mel.seconds)
        out["model"] = model
    return out


def nets_part(repeats: int = 3) -> dict:
    """Training-step time (forward + backward, bf16 autocast, batch 16) of the shared U-Net on one second of 8 kHz
    audio as a 64x64 log-mel image (the shipped sound model's network) and as a raw waveform (dims=1, 8192
    samples, two more levels so that its attention also sees a 256-long sequence, DiffWave-like receptive
    field), both with 32 base channels and no conditioning."""
    from reverie.nets import create_network

    shapes = {"mel_2d": ((16, 1, 64, 64), {"channel_mult": (1, 2, 2, 2), "attention_resolutions": (16, 8)}),
              "waveform_1d": ((16, 1, 8192), {"dims": 1, "channel_mult": (1, 2, 2, 2, 2, 2),
                                               "attention_resolutions": (256,)})}
    out = {}
    for name, (shape, overrides) in shapes.items():
        net = create_network("unet-tiny", in_channels=1, out_channels=1, model_channels=32, head_channels=32,
                             sample_size=shape[-1], **overrides)
        x, t = torch.randn(shape), torch.full((shape[0],), 500.0)
        times = []
        for k in range(repeats + 1):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = net(x, t).float().square().mean()
            loss.backward()
            if k:  # the first is warm-up
                times.append(time.perf_counter() - start)
        out[name] = {"step_s": float(np.median(times)), "parameters": sum(p.numel() for p in net.parameters())}
    out["waveform_over_mel"] = out["waveform_1d"]["step_s"] / out["mel_2d"]["step_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sounds", default=None, help="a sounds model directory")
    p.add_argument("--speech", default=None, help="a class-conditioned speech model directory ('' : classifier only)")
    p.add_argument("--nets", action="store_true", help="also time the 2-D mel vs 1-D waveform U-Net step")
    p.add_argument("--layouts", choices=("auto", "none"), default="auto",
                   help="a layout model's piano rolls: planned from each caption (auto) or none (the caption alone; "
                        "results under sounds_without_layouts)")
    p.add_argument("--vague", action="store_true",
                   help="also score prompts that leave the root and speed open against their planned rolls "
                        "(sounds_vague_prompts)")
    p.add_argument("--limit", type=int, default=0, help="at most this many held-out captions (0: all)")
    p.add_argument("--per-digit", type=int, default=20, help="generated clips per digit")
    p.add_argument("--epochs", type=int, default=10, help="classifier epochs")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default=str(RESULTS / "audio.json"))
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    shown = {k: v for k, v in vars(args).items() if v not in (None, "") and k != "output"}
    result = {"machine": f"CPU, {torch.get_num_threads()} thread(s)", "command": "python benchmarks/audio.py " +
              " ".join(f"--{k.replace('_', '-')}={v}" for k, v in shown.items())}
    if args.nets:
        result["nets"] = nets_part()
    if args.sounds and not args.vague:
        key = "sounds" if args.layouts == "auto" else "sounds_without_layouts"
        result[key] = sounds_part(args.sounds, args.limit, args.seed, args.batch, args.layouts)
    if args.speech is not None:
        result["speech"] = speech_part(args.speech, args.per_digit, args.seed, args.batch, args.epochs)
    if args.sounds and args.vague:
        result["sounds_vague_prompts"] = vague_part(args.sounds, args.seed, args.batch)
    for part in ("nets", "sounds", "sounds_without_layouts", "sounds_vague_prompts", "speech"):  # with its command
        if part in result:
            result[part]["command"] = result["command"]
    path = Path(args.output)
    previous = json.loads(path.read_text()) if path.is_file() else {}
    previous.update({k: v for k, v in result.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(previous, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
