"""Commands for sound: ``generate-audio`` (text or label to WAV files that carry their parameters and, where
c2pa-python is installed, a signed manifest; optionally a spectrogram picture) and ``data speech`` (render
the espeak-ng digit clips once into the cache)."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from .common import UserError, at_least, output_file, sampling_options, sampling_parent, show_progress

DEFAULT_AUDIO_MODEL = Path(__file__).resolve().parent.parent / "assets" / "sounds-t2a"
MAX_CLIPS = 16


def add_commands(sub, fmt) -> None:
    g = sub.add_parser("generate-audio", help="generate sound from a text prompt (WAV)", formatter_class=fmt,
                       parents=[sampling_parent()])
    g.add_argument("prompt", nargs="?", default="",
                   help='what to hear, e.g. "a falling minor arpeggio on a square wave"')
    g.add_argument("--model", default=None, help="audio model directory (default: the shipped sound model)")
    g.add_argument("-o", "--output", default="out.wav",
                   help="output WAV; with --num-clips N > 1, NAME-000.wav, NAME-001.wav, ...")
    g.add_argument("--num-clips", type=at_least(1), default=1, help=f"how many clips (at most {MAX_CLIPS})")
    g.add_argument("--label", type=at_least(0), default=None, help="class-conditioned models: the class to make")
    g.add_argument("--spectrogram", default=None, metavar="PNG", help="also draw the clips' spectrograms into this PNG")
    g.add_argument("--griffin-lim-iters", type=at_least(1), default=64, help="Griffin-Lim iterations (phase recovery)")
    g.add_argument("--layout", default="auto",
                   help="layout models: auto (plan each note's row and time from the prompt: a piano roll), none "
                        "(the prompt alone), or a JSON list (or .json file) of [phrase, [t0, y0, t1, y1]] in "
                        "fractions of the clip and of the spectrogram's rows, low to high")
    g.add_argument("--from-wav", default=None, help="reproduce a clip from a WAV's stored parameters")
    g.set_defaults(func=generate_audio)


def add_data_command(dsub, fmt) -> None:
    """``reverie data speech``: a subcommand of ``reverie data`` (``reverie.cli.info``)."""
    sp = dsub.add_parser("speech", help="render the spoken-digit clips with espeak-ng into the cache (once)",
                         formatter_class=fmt)
    sp.add_argument("--per-word", type=at_least(1), default=200, help="clips of each digit")
    sp.add_argument("--seed", type=at_least(0), default=0, help="which voices, pitches and speeds")
    sp.set_defaults(func=data_speech)


def data_speech(args) -> int:
    from ..data.speech import WORDS, cache_path, make_speech_cache

    existed = cache_path(args.per_word, args.seed).is_file()
    start = time.perf_counter()
    path = make_speech_cache(args.per_word, args.seed, progress=show_progress(args))
    what = "already there" if existed else f"rendered in {time.perf_counter() - start:.1f} s"
    print(f"{args.per_word * len(WORDS)} speech clips {what}: {path}")
    return 0


def _outputs(output: str, n: int) -> list[Path]:
    path = output_file(output, (".wav",))
    return [path] if n == 1 else [path.with_name(f"{path.stem}-{i:03d}.wav") for i in range(n)]


def _request(args):
    """(prompt, label, number of clips, index of one clip to keep or None, Griffin-Lim iterations, SamplingOptions)
    of the command line or of --from-wav (which makes its whole batch again and keeps its clip)."""
    from ..provenance.wav import read_wav_parameters
    from ..sampling import SamplingOptions
    from .generate import layout_arg

    if not args.from_wav:
        if args.num_clips > MAX_CLIPS:
            raise UserError(f"--num-clips must be between 1 and {MAX_CLIPS}, got {args.num_clips}")
        options = sampling_options(args, layout_arg(args.layout))
        return args.prompt, args.label, args.num_clips, None, args.griffin_lim_iters, options
    meta = read_wav_parameters(Path(args.from_wav))
    options = SamplingOptions.from_metadata(meta, args.from_wav)  # the stored layout (auto plans it again alike)
    iters = meta.get("griffin_lim_iters", 64)
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise UserError(f"{args.from_wav}: griffin_lim_iters must be a positive integer, got {iters!r}")
    num, index = meta.get("num_clips", 1), meta.get("index")
    if not isinstance(num, int) or isinstance(num, bool) or not 1 <= num <= MAX_CLIPS:
        raise UserError(f"{args.from_wav}: num_clips must be an integer from 1 to {MAX_CLIPS}, got {num!r}")
    if index is not None and (not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < num):
        raise UserError(f"{args.from_wav}: index must be an integer from 0 to {num - 1}, got {index!r}")
    return meta.get("prompt", ""), meta.get("label"), num, index, iters, options


def generate_audio(args) -> int:
    import torch

    from ..pipeline import Pipeline
    from ..provenance.wav import save_wav
    from ..sound import audio_spec, spectrogram_png
    from ..sound import generate_audio as generate

    prompt, label, num, index, iters, options = _request(args)
    outputs = _outputs(args.output, num if index is None else 1)
    if args.spectrogram:
        output_file(args.spectrogram, (".png",), "--spectrogram")
    pipe = Pipeline.from_pretrained(Path(args.model) if args.model else DEFAULT_AUDIO_MODEL)
    mel = audio_spec(pipe)
    labels = None
    if label is not None:
        if pipe.conditioning != "class":
            raise UserError(f"--label applies to class-conditioned models; {pipe.name} is conditioned on "
                            f"{pipe.conditioning}")
        if label >= pipe.info["num_classes"]:
            raise UserError(f"--label must be below {pipe.info['num_classes']} for {pipe.name}, got {label}")
        labels = torch.full((num,), label, dtype=torch.long)
    used = dataclasses.replace(options.resolve(pipe.cfg), grid=options.grid)
    start = time.perf_counter()
    waves, images, rate = generate(pipe, prompt, num, options, class_labels=labels, griffin_lim_iters=iters,
                                   progress=show_progress(args))
    elapsed = time.perf_counter() - start
    params = {"prompt": prompt, "num_clips": num, **used.to_metadata(), "model": pipe.name,
              "model_hash": pipe.weights_hash,
              "griffin_lim_iters": iters, "seconds": mel.seconds, "watermark": "off"}
    if label is not None:
        params["label"] = label
    numbers = range(num) if index is None else [index]
    for path, i in zip(outputs, numbers):
        save_wav(waves[i], rate, path, {**params, "index": i} if num > 1 else params)
    if args.spectrogram:
        spectrogram_png(images[list(numbers)], mel, args.spectrogram, titles=[prompt or f"label {label}"])
    where = outputs[0] if len(outputs) == 1 else f"{outputs[0].parent / outputs[0].stem[:-4]}-*.wav"
    print(f"generated {len(outputs)} clip(s) of {mel.seconds:g} s at {rate} Hz in {elapsed:.2f} s -> {where}"
          + (f" (spectrogram: {args.spectrogram})" if args.spectrogram else ""), file=sys.stdout)
    return 0
