"""Damaged inputs and user mistakes through the real ``reverie`` command (issue "Hardening").

The contract: a user mistake or a damaged input makes every command print ONE line ``reverie: error: ...``
to stderr (naming the file or option, what is wrong and what is valid) and exit with status 2, never a
traceback; the checks come before expensive work (an unwritable output is refused before generating, a
training run that cannot start leaves no checkpoints).

Every case damages a real file that reverie wrote: a tiny text-to-image model directory (with and without
EMA weights), a two-step training run with a checkpoint, a PNG from ``reverie generate``, a grid file from
``tune-grid``, the run's own ``config.json`` and a shipped YAML config. The ``sources`` fixture builds them
once per session; each case copies what it damages into its own folder and runs one subprocess there.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import load_file, save_file

from helpers import RGB16, TEXT_MODEL, tiny_config, tiny_network

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds for one command
FAST = 30  # seconds: a command that must refuse at once (before sampling or training)
RUN_TINY = ("--train.steps=2", "--train.checkpoint_every=2", "--sample.every=0", "--data.batch_size=2",
            "--data.options={length: 8}", "--train.progress=false")


@dataclass(frozen=True)
class Sources:
    """The pristine files every case starts from (never modified: cases copy what they damage)."""

    plain: Path  # a text-to-image model directory without EMA weights
    ema: Path  # the same kind of model with ema.safetensors
    run: Path  # a training run: config.json, checkpoints/ckpt-00000002, model/
    png: Path  # a PNG written by `reverie generate` from `plain`
    grid: Path  # a grid file written by tune-grid for `plain`
    yaml: Path  # a shipped training config


@pytest.fixture(scope="session")
def sources(tmp_path_factory, make_model_dir) -> Sources:
    from reverie.build import save_diffusion
    from reverie.configs import load_config
    from reverie.pipeline import Pipeline
    from reverie.train import train
    from reverie.train.config import TrainConfig
    from toy_data import Toy

    base = tmp_path_factory.mktemp("sources")
    plain = make_model_dir("tiny", TEXT_MODEL, RGB16)
    cfg = tiny_config(*TEXT_MODEL)
    net = tiny_network(cfg, RGB16, seed=1)
    ema = save_diffusion(base / "tiny-ema", cfg, RGB16, net, ema_net=tiny_network(cfg, RGB16, seed=2))

    run = base / "run"
    net_overrides = "{model_channels: 8, channel_mult: [1, 2], attention_resolutions: [8], head_channels: 8}"
    train(load_config(TrainConfig, None, [
        f"--model.network_overrides={net_overrides}", "--data.batch_size=4", "--data.resolution=16",
        "--train.progress=false", "--sample.every=0", "--optim.warmup_steps=2", "--model.conditioning=class",
        "--train.steps=2", "--train.checkpoint_every=2", f"--train.out_dir={run}"]), resume=False, dataset=Toy(16))
    assert len(list((run / "checkpoints").glob("ckpt-*"))) == 1 and (run / "config.json").is_file()

    png = base / "base.png"
    done = subprocess.run([sys.executable, "-m", "reverie", "generate", "a red circle", "--model", str(plain),
                           "--steps", "2", "--num-images", "1", "-o", str(png)],
                          cwd=base, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert "sampler" in json.loads(Image.open(png).text["reverie"])

    grid = Pipeline.from_pretrained(plain).tune_grid("dpmpp_2m", 2, pilot=1, teacher_steps=4).save(base / "grid.json")
    return Sources(plain=plain, ema=ema, run=run, png=png, grid=grid, yaml=ROOT / "configs" / "shapes-tiny.yaml")


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("REVERIE_DEBUG", None)
    return env


# --- damaging files ----------------------------------------------------------------------------------------


def copy_dir(src: Path, tmp: Path, name: str) -> Path:
    return Path(shutil.copytree(src, tmp / name))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 16 + b"this is not a safetensors file\n")


def empty(path: Path) -> None:
    path.write_bytes(b"")


def huge_header(path: Path) -> None:
    """The first 8 bytes (the little-endian header length) claim an exabyte-sized header."""
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**60) + data[8:])


def flip_header_byte(path: Path) -> None:
    """One bit flipped in a quote character in the middle of the JSON header: the header is no longer JSON."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    i = data.index(b'"', 8 + n // 2, 8 + n)
    data[i] ^= 0x20  # '"' -> '\x02'
    path.write_bytes(bytes(data))


def edit_tensors(path: Path, edit: Callable[[dict], None]) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def wrong_shape(t: dict) -> None:
    w = t["net.conv_in.weight"]
    t["net.conv_in.weight"] = torch.zeros(w.shape[0] + 1, *w.shape[1:])


def missing_tensor(t: dict) -> None:
    del t["net.conv_in.weight"]


def extra_tensor(t: dict) -> None:
    t["net.bogus_layer.weight"] = torch.zeros(3, 3)


def edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    """Rewrite a JSON file with ``edit(data)`` applied (its return value replaces the data when not None)."""
    data = json.loads(path.read_text())
    out = edit(data)
    path.write_text(json.dumps(data if out is None else out, indent=2))


def _set(keys: tuple, value):
    def edit(d):
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


def _del(*keys):
    def edit(d):
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
    return edit


# --- command lines -----------------------------------------------------------------------------------------


def gen(model, *extra) -> list[str]:
    return ["generate", "a red circle", "--model", str(model), "--steps", "2", "--num-images", "1", "-o", "out.png",
            *extra]


# Options that make the work itself take minutes (about 95 s for `generate` on one core): a bad output
# path must be refused before it, within FAST seconds.
BIG_GENERATE = ("--steps", "1000", "--num-images", "64")
BIG_SAMPLE = ("--steps", "1000", "--n", "64")


def samp(model, *extra) -> list[str]:
    return ["sample", str(model), "--n", "1", "--steps", "2", "-o", "samples.png", *extra]


# --- the cases, grouped by what is damaged -----------------------------------------------------------------


def weights_case(which: str, damage, command: str):
    """Damage ``model`` or ``ema`` weights of a copied model dir and run generate / sample / inspect on it."""
    def make(s: Sources, tmp: Path) -> list[str]:
        model = copy_dir(s.ema if which == "ema" else s.plain, tmp, "tiny")
        f = model / f"{which}.safetensors"
        if isinstance(damage, tuple):
            edit_tensors(f, damage[0])
        else:
            damage(f)
        if command == "sample":
            return samp("tiny", *(["--no-ema"] if which == "model" and (model / "ema.safetensors").exists() else []))
        return ["inspect", "tiny"] if command == "inspect" else gen("tiny")
    return make


def config_case(edit, command: str = "generate", raw: Callable[[str], bytes] | None = None):
    def make(s: Sources, tmp: Path) -> list[str]:
        model = copy_dir(s.plain, tmp, "tiny")
        cfg = model / "config.json"
        if raw is not None:
            cfg.write_bytes(raw(cfg.read_text()))
        else:
            edit_json(cfg, edit)
        return {"generate": gen("tiny"), "sample": samp("tiny"), "inspect": ["inspect", "tiny"]}[command]
    return make


def run_case(damage, command: str):
    """Damage a copy of the training run (``damage(run_dir)``) and run export / inspect / sample on it."""
    def make(s: Sources, tmp: Path) -> list[str]:
        run = copy_dir(s.run, tmp, "tiny-run")
        damage(run)
        return {"export": ["export", "tiny-run", "-o", "exported"], "inspect": ["inspect", "tiny-run"],
                "sample": samp("tiny-run")}[command]
    return make


def ckpt(run: Path) -> Path:
    (found,) = (run / "checkpoints").glob("ckpt-*")
    return found


def png_case(name: str, edit=None, text: str | None = None, strip: bool = False):
    """A copy of the generated PNG named ``name`` whose ``reverie`` chunk is ``edit(params)`` or ``text``
    (or that has no text chunks at all), run through ``generate --from-png``."""
    def make(s: Sources, tmp: Path) -> list[str]:
        with Image.open(s.png) as im:
            im.load()
            chunks = dict(im.text)
            info = PngInfo()
            if not strip:
                params = json.loads(chunks["reverie"])
                if edit is not None:
                    out = edit(params)
                    params = params if out is None else out
                info.add_text("reverie", text if text is not None else json.dumps(params))
                info.add_text("parameters", chunks.get("parameters", ""))
            im.save(tmp / name, pnginfo=info)
        return ["generate", "--from-png", name, "--model", str(s.plain), "-o", "out.png"]
    return make


def text_png(s: Sources, tmp: Path) -> list[str]:
    (tmp / "notes.png").write_text("a red circle, seed 0, 20 steps\n")
    return ["generate", "--from-png", "notes.png", "--model", str(s.plain), "-o", "out.png"]


def yaml_case(name: str, damage: Callable[[str], bytes | str], *extra: str):
    """A copy of the shipped config named ``name``, damaged, through ``train --dry-run``."""
    def make(s: Sources, tmp: Path) -> list[str]:
        out = damage(s.yaml.read_text())
        (tmp / name).write_bytes(out if isinstance(out, bytes) else out.encode())
        return ["train", name, "--dry-run", *extra]
    return make


def replace_once(old: str, new: str):
    def damage(text: str) -> str:
        assert text.count(old) == 1, old
        return text.replace(old, new)
    return damage


def train_case(*overrides: str, dry_run: bool = False):
    """The run's own config.json with tiny settings and ``overrides``: a real `reverie train` (out_dir ./out)."""
    def make(s: Sources, tmp: Path) -> list[str]:
        shutil.copyfile(s.run / "config.json", tmp / "run-config.json")
        return ["train", "run-config.json", *RUN_TINY, "--train.out_dir=out", *overrides,
                *(["--dry-run"] if dry_run else [])]
    return make


def run_config_syntax(s: Sources, tmp: Path) -> list[str]:
    text = (s.run / "config.json").read_text()
    (tmp / "run-config.json").write_text(text.replace('"steps":', '"steps"', 1))
    return ["train", "run-config.json", "--dry-run"]


def layout_case(layout: str):
    def make(s: Sources, tmp: Path) -> list[str]:
        return gen(s.plain, "--layout", layout)
    return make


def layout_file(s: Sources, tmp: Path) -> list[str]:
    (tmp / "bad-layout.json").write_text('[["red circle", [0.1, 0.1, 0.4')
    return gen(s.plain, "--layout", "bad-layout.json")


def data_case(name: str, setup: Callable[[Sources, Path], None] | None = None, root: str | None = None):
    def make(s: Sources, tmp: Path) -> list[str]:
        if setup is not None:
            setup(s, tmp)
        return ["data", "preview", name, *(["--root", root] if root else []), "--resolution", "16", "--n", "1",
                "-o", "preview.png"]
    return make


def empty_folder(s: Sources, tmp: Path) -> None:
    (tmp / "empty-folder").mkdir()


def latin1_metadata(s: Sources, tmp: Path) -> None:
    folder = tmp / "captioned"
    folder.mkdir()
    shutil.copyfile(s.png, folder / "a.png")
    (folder / "metadata.jsonl").write_bytes('{"file_name": "a.png", "text": "un caf\xe9 rouge"}\n'.encode("latin-1"))


def blocker(tmp: Path) -> None:
    """A plain FILE named ``blocker``: an output path under it cannot be created."""
    (tmp / "blocker").write_text("I am a file, not a folder\n")


def output_case(argv: Callable[[Sources], list[str]], setup: Callable[[Path], None] = blocker):
    def make(s: Sources, tmp: Path) -> list[str]:
        setup(tmp)
        return argv(s)
    return make


def existing_dir(tmp: Path) -> None:
    (tmp / "existing-dir").mkdir()


def outdir_file(tmp: Path) -> None:
    (tmp / "not-a-dir").write_text("a file\n")


def read_only_dir(tmp: Path) -> None:
    (tmp / "read-only").mkdir()
    (tmp / "read-only").chmod(0o555)


def grid_case(damage):
    def make(s: Sources, tmp: Path) -> list[str]:
        shutil.copyfile(s.grid, tmp / "bad-grid.json")
        damage(tmp / "bad-grid.json")
        return ["sample", str(s.plain), "--n", "1", "--grid", "bad-grid.json", "--sampler", "dpmpp_2m",
                "-o", "samples.png"]
    return make


@dataclass(frozen=True)
class Case:
    make: Callable[[Sources, Path], list[str]]  # builds the damaged input in the case's folder; returns the argv
    expect: tuple  # substrings of the error line (case-insensitive); a tuple item: any one of its strings
    fast: bool = False  # must finish within FAST seconds (refused before sampling / training)
    no_checkpoints: bool = False  # no `checkpoints` folder may appear anywhere in the case's folder
    absent: tuple = ()  # paths (relative to the case's folder) that must not exist afterwards
    needs_non_root: bool = False


def case(case_id: str, make, *expect, **kw):
    return pytest.param(Case(make, expect, **kw), id=case_id)


# Key words of which the error line must hold one (the file or option name alone could hide a vague message).
DAMAGED = ("damaged", "truncated", "corrupt", "not a safetensors", "invalid")
BAD_JSON = ("not valid json", "invalid json", "not json", "cannot parse", "could not parse", "syntax", "expecting")
NOT_FOUND = ("not found", "does not exist", "no such", "missing")
NOT_OBJECT = ("object", "mapping", "dict")
UTF8 = ("utf-8", "utf8")
MODEL_ST, EMA_ST = "tiny/model.safetensors", "tiny/ema.safetensors"

CASES = [
    # model directories: weights
    case("model-weights-truncated", weights_case("model", truncate, "generate"), MODEL_ST, DAMAGED),
    case("ema-weights-truncated", weights_case("ema", truncate, "generate"), EMA_ST, DAMAGED),
    case("model-weights-garbage", weights_case("model", garbage, "sample"), MODEL_ST, DAMAGED),
    case("ema-weights-garbage", weights_case("ema", garbage, "sample"), EMA_ST, DAMAGED),
    case("model-weights-empty", weights_case("model", empty, "inspect"), MODEL_ST, DAMAGED + ("empty",)),
    case("ema-weights-empty", weights_case("ema", empty, "generate"), EMA_ST, DAMAGED + ("empty",)),
    case("model-weights-huge-header", weights_case("model", huge_header, "inspect"), MODEL_ST, DAMAGED),
    case("ema-weights-huge-header", weights_case("ema", huge_header, "sample"), EMA_ST, DAMAGED),
    case("model-weights-flipped-header-byte", weights_case("model", flip_header_byte, "inspect"), MODEL_ST, DAMAGED),
    case("ema-weights-flipped-header-byte", weights_case("ema", flip_header_byte, "generate"), EMA_ST, DAMAGED),
    case("model-weights-truncated-sample", weights_case("model", truncate, "sample"), MODEL_ST, DAMAGED),
    case("model-tensor-wrong-shape", weights_case("model", (wrong_shape,), "generate"), MODEL_ST,
         "net.conv_in.weight"),
    case("ema-tensor-wrong-shape", weights_case("ema", (wrong_shape,), "sample"), EMA_ST, "net.conv_in.weight"),
    case("model-tensor-missing", weights_case("model", (missing_tensor,), "sample"), MODEL_ST,
         "net.conv_in.weight", "missing"),
    case("ema-tensor-missing", weights_case("ema", (missing_tensor,), "generate"), EMA_ST, "net.conv_in.weight",
         "missing"),
    case("model-tensor-extra", weights_case("model", (extra_tensor,), "generate"), MODEL_ST,
         "net.bogus_layer.weight"),
    # model directories: config.json
    case("config-json-syntax-error", config_case(None, raw=lambda t: t.rstrip()[:-1].encode()), "tiny/config.json",
         BAD_JSON),
    case("config-json-syntax-error-inspect", config_case(None, "inspect", raw=lambda t: t.replace(":", "", 1).encode()),
         "tiny/config.json", BAD_JSON),
    case("config-json-not-utf8", config_case(None, "inspect", raw=lambda t: t.replace(
        '"unet-tiny"', '"unet-tin\xe9"').encode("latin-1")), "tiny/config.json", UTF8),
    case("config-json-not-utf8-sample", config_case(None, "sample", raw=lambda t: t.replace(
        '"unet-tiny"', '"unet-tin\xe9"').encode("latin-1")), "tiny/config.json", UTF8),
    case("config-json-list", config_case(lambda d: [d], "sample"), "tiny/config.json", NOT_OBJECT),
    case("config-missing-network", config_case(_del("network")), "tiny/config.json", "network"),
    case("config-missing-network-inspect", config_case(_del("network"), "inspect"), "tiny/config.json", "network"),
    case("config-missing-train-config", config_case(_del("train_config"), "inspect"), "tiny/config.json",
         "train_config"),
    case("config-missing-train-config-generate", config_case(_del("train_config")), "tiny/config.json",
         "train_config"),
    case("config-network-wrong-type", config_case(_set(("network", "model_channels"), "eight")), "tiny/config.json",
         "model_channels"),
    case("config-train-config-wrong-type", config_case(_set(("train_config", "model", "prediction"), 7), "sample"),
         "tiny/config.json", "prediction"),
    case("config-wrong-format", config_case(_set(("format",), "stable-diffusion"), "inspect"), "tiny/config.json",
         "format"),
    case("config-wrong-format-generate", config_case(_set(("format",), "stable-diffusion")), "tiny/config.json",
         "format"),
    case("model-path-is-a-file", lambda s, tmp: gen(copy_dir(s.plain, tmp, "tiny") / "model.safetensors"),
         MODEL_ST, ("a file", "not a directory", "is a file")),
    case("model-path-is-a-file-sample", lambda s, tmp: samp(copy_dir(s.plain, tmp, "tiny") / "config.json"),
         "tiny/config.json", ("a file", "not a directory", "is a file")),
    case("model-dir-missing", lambda s, tmp: gen("no-such-model"), "no-such-model", NOT_FOUND),
    case("model-dir-missing-sample", lambda s, tmp: samp("no-such-model"), "no-such-model", NOT_FOUND),
    case("model-dir-missing-inspect", lambda s, tmp: ["inspect", "no-such-model"], "no-such-model",
         NOT_FOUND),
    case("latent-autoencoder-missing", config_case(_set(("autoencoder",), "autoencoder")), "autoencoder",
         NOT_FOUND),
    # checkpoints and runs
    case("ckpt-tensors-truncated", run_case(lambda r: truncate(ckpt(r) / "tensors.safetensors"), "export"),
         "tensors.safetensors", DAMAGED, absent=("exported",)),
    case("ckpt-tensors-garbage", run_case(lambda r: garbage(ckpt(r) / "tensors.safetensors"), "inspect"),
         "tensors.safetensors", DAMAGED),
    case("ckpt-tensors-truncated-sample", run_case(lambda r: truncate(ckpt(r) / "tensors.safetensors"), "sample"),
         "tensors.safetensors", DAMAGED),
    case("ckpt-state-not-json", run_case(lambda r: (ckpt(r) / "state.json").write_text('{"step": 2, "model": '),
                                         "inspect"), "state.json", BAD_JSON),
    case("ckpt-state-not-json-sample", run_case(lambda r: (ckpt(r) / "state.json").write_text("step=2\n"), "sample"),
         "state.json", BAD_JSON),
    case("ckpt-state-missing-config", run_case(lambda r: edit_json(ckpt(r) / "state.json", _del("config")), "export"),
         "state.json", "config", absent=("exported",)),
    case("run-without-checkpoints", run_case(lambda r: shutil.rmtree(ckpt(r)), "export"), "tiny-run", "checkpoint",
         absent=("exported",)),
    case("run-without-checkpoints-inspect", run_case(lambda r: shutil.rmtree(ckpt(r)), "inspect"), "tiny-run",
         "checkpoint"),
    # PNGs for generate --from-png
    case("png-missing-sampler", png_case("frame-a.png", _del("sampler")), "frame-a.png", "sampler",
         absent=("out.png",)),
    case("png-string-seed", png_case("frame-b.png", _set(("seed",), "zero")), "frame-b.png", "seed"),
    case("png-index-out-of-range", png_case("frame-c.png", _set(("index",), 5)), "frame-c.png", "index"),
    case("png-fractional-steps", png_case("frame-d.png", _set(("steps",), 2.5)), "frame-d.png", "steps"),
    case("png-unknown-sampler", png_case("frame-e.png", _set(("sampler",), "bogus")), "frame-e.png", "bogus",
         "dpmpp_2m"),
    case("png-negative-guidance", png_case("frame-f.png", _set(("guidance",), -1.0)), "frame-f.png", "guidance"),
    case("png-increasing-grid", png_case("frame-g.png", lambda d: d.update(grid=[0.5, 2.0, 8.0, 0.0], steps=3)),
         "frame-g.png", "grid", absent=("out.png",)),
    case("png-malformed-layout", png_case("frame-h.png", _set(("layout",), [["red circle", [0.1, 0.2, 0.3]]])),
         "frame-h.png", "layout"),
    case("png-parameters-not-json", png_case("frame-i.png", text='{"prompt": "a red circle", '), "frame-i.png",
         BAD_JSON),
    case("png-parameters-json-list", png_case("frame-j.png", text='["a red circle", 0]'), "frame-j.png", NOT_OBJECT),
    case("png-text-file", text_png, "notes.png"),
    case("png-without-parameters", png_case("bare.png", strip=True), "bare.png", ("parameters", "metadata")),
    case("png-missing-file", lambda s, tmp: ["generate", "--from-png", "gone.png", "-o", "out.png"], "gone.png",
         NOT_FOUND),
    # training configs
    case("train-yaml-syntax-error", yaml_case("broken.yaml", lambda t: t + "\nmodel: [unet-tiny, {\n"),
         "broken.yaml"),
    case("train-yaml-unknown-key", yaml_case("typo.yaml", replace_once("  lr: 8.0e-4", "  lrr: 8.0e-4")), "lrr"),
    case("train-yaml-wrong-type", yaml_case("type.yaml", replace_once("  steps: 3200", "  steps: many")), "steps"),
    case("train-yaml-top-level-list", yaml_case("list.yaml", lambda t: "- " + t.replace("\n", "\n  ")), "list.yaml"),
    case("train-binary-config", yaml_case("weights.yaml", lambda t: bytes(range(256)) * 4), "weights.yaml"),
    case("train-run-config-json-syntax", run_config_syntax, "run-config.json", BAD_JSON),
    case("train-unknown-sampler-dry-run", yaml_case("ok.yaml", lambda t: t, "--sample.sampler=bogus"), "sampler",
         "dpmpp_2m"),
    case("train-unknown-network-dry-run", yaml_case("ok.yaml", lambda t: t, "--model.network=unet-huge"),
         "unet-huge", "unet-tiny"),
    case("train-empty-out-dir", train_case("--train.out_dir="), "out_dir", fast=True, no_checkpoints=True),
    case("train-imagefolder-without-root", train_case("--data.name=imagefolder", "--data.options={}"),
         "imagefolder", "root", fast=True, no_checkpoints=True),
    case("train-unknown-network", train_case("--model.network=unet-huge"), "unet-huge", "unet-tiny", fast=True,
         no_checkpoints=True),
    case("train-init-from-missing", train_case("--train.init_from=/nonexistent"), "/nonexistent", fast=True,
         no_checkpoints=True),
    case("train-autoencoder-missing", train_case("--model.autoencoder=/nonexistent"), "/nonexistent", fast=True,
         no_checkpoints=True),
    # layouts
    case("layout-three-numbers", layout_case('[["red circle", [0.1, 0.2, 0.3]]]'), "--layout",
         absent=("out.png",)),
    case("layout-x1-before-x0", layout_case('[["red circle", [0.6, 0.1, 0.2, 0.4]]]'), "--layout"),
    case("layout-not-json", layout_case("[[red circle, [0.1, 0.1, 0.4, 0.4]]]"), "--layout"),
    case("layout-file-invalid-json", layout_file, "bad-layout.json", BAD_JSON),
    # data folders
    case("data-root-missing", data_case("imagefolder", root="no-such-folder"), "no-such-folder", NOT_FOUND),
    case("data-root-empty", data_case("imagefolder", empty_folder, root="empty-folder"), "empty-folder",
         ("no readable", "no image", "empty")),
    case("data-metadata-not-utf8", data_case("imagefolder", latin1_metadata, root="captioned"), "metadata.jsonl", UTF8),
    case("data-unknown-dataset", data_case("bogusset"), "bogusset", "imagefolder"),
    # output paths
    case("generate-output-under-a-file", output_case(lambda s: gen(s.plain, *BIG_GENERATE, "-o", "blocker/out.png")),
         "blocker", fast=True),
    case("generate-output-is-a-directory", output_case(lambda s: gen(s.plain, *BIG_GENERATE, "-o", "existing-dir"),
                                                       existing_dir), "existing-dir", "directory", fast=True),
    case("generate-output-not-png", output_case(lambda s: gen(s.plain, *BIG_GENERATE, "-o", "out.txt"),
                                                lambda tmp: None), "out.txt", ".png", fast=True,
         absent=("out.txt",)),
    case("generate-out-dir-is-a-file", output_case(lambda s: gen(s.plain, *BIG_GENERATE, "--out-dir", "not-a-dir"),
                                                   outdir_file), "not-a-dir",
         ("a file", "not a directory"), fast=True),
    case("generate-output-read-only-dir", output_case(lambda s: gen(s.plain, *BIG_GENERATE, "-o", "read-only/out.png"),
                                                      read_only_dir), "read-only", fast=True, needs_non_root=True),
    case("sample-output-under-a-file", output_case(lambda s: samp(s.plain, *BIG_SAMPLE, "-o", "blocker/samples.png")),
         "blocker", fast=True),
    case("tune-grid-output-under-a-file", output_case(lambda s: [
        "tune-grid", str(s.plain), "--steps", "4", "--pilot", "16", "--teacher-steps", "1000",
        "-o", "blocker/grid.json"]), "blocker", fast=True),
    case("eval-json-under-a-file", output_case(lambda s: [
        "eval", str(s.plain), "--metrics", "fid", "--n", "64", "--batch-size", "64", "--ref-n", "2", *BIG_SAMPLE[:2],
        "--device", "cpu", "--json", "blocker/results.json"]), "blocker", fast=True),
    # grid files
    case("grid-file-garbage", grid_case(garbage), "bad-grid.json", BAD_JSON + DAMAGED),
    case("grid-file-missing-fields", grid_case(lambda p: edit_json(p, _del("sigmas"))), "bad-grid.json", "sigmas"),
    # memory
    case("sample-too-many-images", lambda s, tmp: ["sample", str(s.plain), "--n", "100000", "--steps", "2",
                                                   "-o", "samples.png"], ("batch", "--out-dir"), fast=True),
]


@pytest.mark.parametrize("spec", CASES)
def test_damaged_input_gives_one_line_and_status_2(spec: Case, sources: Sources, tmp_path: Path):
    if spec.needs_non_root and hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("running as root: root can write into a read-only directory")
    work = tmp_path / "work"
    work.mkdir()
    argv = spec.make(sources, work)
    command = f"reverie {' '.join(map(str, argv))}"
    limit = 2 * FAST if spec.fast else TIMEOUT
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "reverie", *map(str, argv)], cwd=work, env=_env(),
                              capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"{command}\nstill running after {limit} s: not refused before the work; stderr ends:\n"
                    + "\n".join(err.strip().splitlines()[-3:]))
    finally:
        if spec.needs_non_root:
            for p in work.rglob("*"):
                if p.is_dir():
                    p.chmod(0o755)
    elapsed = time.perf_counter() - start
    tail = "\n".join(done.stderr.strip().splitlines()[-3:])
    where = f"{command}\nexit {done.returncode} after {elapsed:.1f} s; stderr ends:\n{tail}"

    lines = [line for line in done.stderr.splitlines()
             if line.strip() and not line.startswith("reverie: warning")]
    problems = []
    if "Traceback" in done.stderr:
        problems.append("a traceback on stderr")
    if not (len(lines) == 1 and lines[0].startswith("reverie: error:")):
        problems.append(f"stderr is {len(lines)} line(s), not one 'reverie: error: ...' line")
    if done.returncode != 2:
        problems.append(f"exit status {done.returncode}, not 2")
    message = lines[0].lower() if lines else ""
    for want in spec.expect:
        options = (want,) if isinstance(want, str) else want
        if not any(w.lower() in message for w in options):
            problems.append(f"the error line lacks {' / '.join(options)!r}")
    if spec.fast and elapsed >= FAST:
        problems.append(f"took {elapsed:.1f} s: must be refused at once (within {FAST} s)")
    if spec.no_checkpoints:
        made = [str(p.relative_to(work)) for p in work.rglob("checkpoints")]
        if made:
            problems.append(f"a run that cannot start wrote {made}")
    problems += [f"{path} was written" for path in spec.absent if (work / path).exists()]
    if problems:
        pytest.fail("; ".join(problems) + f"\n{where}", pytrace=False)
    print(where)  # with -rP: what a passing case printed
