"""Sounds as piano rolls: the log-frequency spectrogram (a note on its row, harmonics at fixed row offsets,
the Griffin-Lim round trip), captions read back, layouts that sit where the notes sound, and the planner
getting the model's own spectrogram at sampling time."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import NET, TEXT, cli
from reverie.audio import MelSpec, log_filterbank, midi_to_hz
from reverie.data.sounds import (
    LOG_RANGE_MIDI,
    SoundsDataset,
    SoundSpec,
    all_specs,
    default_spectrogram,
    parse_caption,
    plan_sound,
    plan_sound_layout,
    render,
    spec_layout,
)
from reverie.eval.audio import note_accuracy
from reverie.layout import box_masks, get_planner, plan_layouts, planner_rng
from reverie.provenance.wav import read_wav_parameters
from reverie.sampling import resolve_layouts

LOG = default_spectrogram()
SR = LOG.sample_rate


def test_log_rows_are_semitones_centered_on_notes():
    assert LOG.scale == "log" and LOG.n_mels == 64
    midi = np.arange(40, 104)
    assert np.allclose(LOG.centers(), midi_to_hz(midi)) and np.allclose(LOG.row(midi_to_hz(midi)), np.arange(64))
    mel = MelSpec()  # the mel rows: row() inverts centers() there too
    assert np.allclose(mel.row(mel.centers()), np.arange(mel.n_mels))
    assert LOG_RANGE_MIDI == (39.5, 103.5)


def test_log_filters_peak_at_their_centers_and_none_is_empty():
    bank = log_filterbank(8000, 512, 64, 100.0, 3000.0)
    freqs = np.linspace(0, 4000, 257)
    assert (bank.sum(1) > 0).all() and bank.max() <= 1 + 1e-6
    # a row wider than two FFT bins reaches 1 at the bin nearest its center and 0 at its neighbours' centers
    centers = 100.0 * 30.0 ** ((np.arange(64) + 0.5) / 64)
    r = 60
    assert bank[r, np.abs(freqs - centers[r]).argmin()] > 0.9
    assert bank[r, freqs <= centers[r - 1]].max() == 0 and bank[r, freqs >= centers[r + 1]].max() == 0


@pytest.mark.parametrize("midi", [60, 67, 83])
def test_a_sine_note_is_loudest_on_its_row_and_a_square_waves_harmonics_keep_their_offsets(midi):
    t = np.arange(LOG.num_samples) / SR
    f0 = float(midi_to_hz(midi))
    column = LOG.encode(torch.from_numpy(0.5 * np.sin(2 * np.pi * f0 * t)))[0, :, 32]
    assert int(column.argmax()) == midi - 40
    square = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in (1, 3))
    column = LOG.encode(torch.from_numpy(0.5 * square))[0, :, 32].numpy()
    third = midi - 40 + 12 * np.log2(3)  # 19.02 rows above, whatever the pitch
    if third < 63:
        assert column[round(third)] > column[round(third) - 3] + 0.2


def test_griffin_lim_through_the_log_spectrogram_keeps_every_note():
    rng = np.random.default_rng(2)
    specs = [SoundSpec("arpeggio", 5, "minor", "falling", "fast", "pluck"), SoundSpec("note", 11, timbre="square"),
             SoundSpec("chord", 2, "major", timbre="sine")]
    waves = np.stack([render(s, SR, LOG.num_samples, rng) for s in specs])
    back = LOG.decode(LOG.encode(torch.from_numpy(waves)), iters=32).numpy()
    assert note_accuracy(back, specs, SR)["note_accuracy"] == 1.0


def test_spec_from_dict_keeps_the_scale_and_refuses_a_wrong_one():
    assert MelSpec.from_dict(LOG.to_dict()) == LOG
    assert MelSpec.from_dict({k: v for k, v in MelSpec().to_dict().items() if k != "scale"}).scale == "mel"
    with pytest.raises(ValueError, match="scale must be"):
        MelSpec(scale="bark")
    with pytest.raises(ValueError, match="scale must be"):
        SoundsDataset(scale="linear")


def test_every_caption_reads_back_to_its_clip():
    for spec in all_specs():
        parsed = parse_caption(spec.caption)
        assert parsed["kind"] == spec.kind
        if spec.kind == "drums":
            assert parsed["pattern"] == spec.pattern
            continue
        assert (parsed["root"], parsed["timbre"]) == (spec.root, spec.timbre)
        if spec.kind != "note":
            assert parsed["quality"] == spec.quality
        if spec.kind == "arpeggio":
            assert (parsed["direction"], parsed["speed"]) == (spec.direction, spec.speed)
        # every word given: the plan is the clip's own layout, whatever the generator
        assert plan_sound_layout(spec.caption, random.Random(7)) == spec_layout(spec, LOG)


@pytest.mark.parametrize("text, root", [("a C# minor chord", 1), ("an E flat note", 3), ("a single A note", 9),
                                        ("a b major chord", 11), ("a note on a sine wave", None),
                                        ("a falling minor arpeggio on a square wave", None)])
def test_roots_in_free_text(text, root):
    assert parse_caption(text)["root"] == root  # the lowercase article "a" is not the note A


def test_the_planner_fills_in_what_the_caption_leaves_open():
    assert plan_sound_layout("the sound of rain", random.Random(0)) is None
    plans = [plan_sound_layout("a falling minor arpeggio on a square wave", random.Random(s)) for s in range(20)]
    rows = [[round(box[1] * 64) for _, box in plan] for plan in plans]
    assert all(len(r) == 4 and r == sorted(r, reverse=True) and r[0] - r[3] == 12 for r in rows)  # falls an octave
    assert all(r[0] - r[1] == 5 and r[1] - r[2] == 4 for r in rows)  # octave, fifth, minor third, root
    assert len({r[3] for r in rows}) > 3 and all("square wave" in p for plan in plans for p, _ in plan)
    drums = plan_sound_layout("kick, snare", random.Random(0))
    assert [p for p, _ in drums][:2] == ["a kick drum", "a snare drum"] and len(drums) == 4
    assert all(box[1] == 0.0 and box[3] == 1.0 for _, box in drums)


def test_vague_captions_leave_words_out_and_keep_the_layout():
    ds, full = SoundsDataset(length=200, vague=0.5), SoundsDataset(length=200)
    captions = [ds.caption(i) for i in range(200)]
    changed = [i for i in range(200) if captions[i] != ds.spec(i).caption]
    assert 60 < len(changed) < 100 and all(full.caption(i) == full.spec(i).caption for i in range(200))
    for i in changed:
        spec, parsed = ds.spec(i), parse_caption(captions[i])
        assert spec.kind != "drums" and (parsed["root"] is None or parsed["speed"] is None)
        assert parsed["root"] in (None, spec.root) and parsed["speed"] in (None, spec.speed)
        assert parsed["timbre"] == spec.timbre
    assert ds[changed[0]]["layout"] == spec_layout(ds.spec(changed[0]), ds.mel)
    assert SoundSpec("arpeggio", 2, "minor", "falling", "slow", "square").describe(root=False, speed=False) == \
        "a falling minor arpeggio on a square wave"


def test_a_plan_replays_from_its_generator():
    prompts = ["a rising minor arpeggio on a sine wave"] * 4
    layouts = plan_layouts(plan_sound_layout, prompts, seed=4)
    assert [spec_layout(plan_sound(p, planner_rng(4, i, p)), LOG) for i, p in enumerate(prompts)] == layouts
    assert len({str(lay) for lay in layouts}) > 1  # each clip of a batch gets its own draw


@pytest.mark.parametrize("scale", ["log", "mel"])
def test_a_notes_box_covers_its_row_where_the_image_is_loudest(scale):
    """The layout paints the row of the note's fundamental over its time span: on the real image of a sine
    arpeggio that row is the loudest one in the middle of every note."""
    ds = SoundsDataset(length=1, scale=scale)
    spec = SoundSpec("arpeggio", 4, "major", "rising", "slow", "sine")
    image = ds.mel.encode(torch.from_numpy(render(spec, SR, ds.mel.num_samples, np.random.default_rng(0))))[0]
    layout = spec_layout(spec, ds.mel)
    masks = box_masks(torch.tensor([[box for _, box in layout]]), (64, 64))[0]
    for (_, onset, offset), mask in zip(spec.notes(), masks):
        rows = mask.any(dim=1).nonzero().flatten().tolist()
        frame = int((onset + offset) / 2 * 64)
        assert len(rows) == 1 and mask[rows[0], frame] == 1
        assert abs(int(image[:, frame].argmax()) - rows[0]) <= (0 if scale == "log" else 1)


def test_dataset_items_carry_their_layout():
    ds = SoundsDataset(length=3)
    for i in range(3):
        assert ds[i]["layout"] == spec_layout(ds.spec(i), ds.mel)
    assert ds.audio_info()["mel"]["scale"] == "log"


def test_sampling_plans_on_the_models_own_spectrogram():
    mel = default_spectrogram(resolution=32)
    model = SimpleNamespace(takes_layouts=True, cfg=SimpleNamespace(data=SimpleNamespace(name="sounds")),
                            info={"audio": {"kind": "mel", "mel": mel.to_dict()}})
    prompt = "a single G note on a sine wave"
    (layout,) = resolve_layouts(model, [prompt], "auto", seed=0)
    assert get_planner("sounds") is plan_sound_layout
    assert layout == spec_layout(SoundSpec("note", 7, timbre="sine"), mel)
    assert layout != plan_sound_layout(prompt, random.Random(0))  # the default spectrogram has 64 rows


# ------------------------------------------------------------------------------------ generate-audio

TINY_LOG = default_spectrogram(resolution=16)
AUDIO16_LOG = {"in_channels": 1, "resolution": 16, "num_classes": 0,
               "audio": {"kind": "mel", "mel": TINY_LOG.to_dict(), "dataset": "sounds"}}


@pytest.fixture(scope="module")
def tiny_roll_model(make_model_dir):
    overrides = (f"--model.network_overrides={NET}", "--model.conditioning=text",
                 f"--model.text_encoder_options={TEXT}", "--data.resolution=16", "--data.name=sounds",
                 "--sample.steps=2", "--model.layout_channels=4")
    return make_model_dir("tiny-t2a-roll", overrides, AUDIO16_LOG)


def _make(model, tmp_path, name, *argv):
    out = tmp_path / name
    assert cli(["generate-audio", "a single G note on a sine wave", "--model", str(model), "-o", str(out),
                "--seed", "3", "--griffin-lim-iters", "2", "-q", *argv]) == 0
    return read_wav_parameters(out)


def test_generate_audio_plans_a_piano_roll_and_reproduces_it(tiny_roll_model, tmp_path):
    auto = _make(tiny_roll_model, tmp_path, "auto.wav")
    none = _make(tiny_roll_model, tmp_path, "none.wav", "--layout", "none")
    given = _make(tiny_roll_model, tmp_path, "given.wav", "--layout", '[["G on a sine wave", [0.0, 0.6, 0.9, 0.7]]]')
    assert auto["layout"] == "auto" and none["layout"] == "none" and given["layout"][0][0] == "G on a sine wave"
    assert len({auto["audio_sha256"], none["audio_sha256"], given["audio_sha256"]}) == 3  # the roll is used
    assert cli(["generate-audio", "--model", str(tiny_roll_model), "--from-wav", str(tmp_path / "auto.wav"),
                "-o", str(tmp_path / "again.wav"), "-q"]) == 0
    assert read_wav_parameters(tmp_path / "again.wav")["audio_sha256"] == auto["audio_sha256"]


def test_generate_audio_bad_layout_is_one_line(tiny_roll_model, tmp_path, capsys):
    code = cli(["generate-audio", "a note", "--model", str(tiny_roll_model), "-o", str(tmp_path / "o.wav"),
                "--layout", "[[1, 2]]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("reverie: error:") and "--layout" in err
