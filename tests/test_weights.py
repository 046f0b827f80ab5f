"""Safetensors files are checked against their size before they are parsed: every kind of damage is one
ValueError naming the file, and an intact file loads exactly."""

import struct

import pytest
import torch
from safetensors.torch import save_file

from reverie.weights import check_safetensors, load_weights


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "empty": torch.zeros(0), "h": torch.ones(2).half()}
    save_file(tensors, str(path))
    return path, tensors


def test_an_intact_file_loads_exactly(good):
    path, tensors = good
    back = load_weights(path)
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert check_safetensors(path)["a"]["shape"] == [3, 4]


def _header(data: bytes) -> tuple[int, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, data[8:8 + n]


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:-7], "lies outside the file"),
    (lambda d: d[:5], "only 5 bytes"),
    (lambda d: b"", "only 0 bytes"),
    (lambda d: struct.pack("<Q", 2**40) + d[8:], "header claims"),
    (lambda d: d[:8] + b"{" * _header(d)[0] + d[8 + _header(d)[0]:], "not JSON"),
    (lambda d: d + b"\0" * 16, "cover"),
    (lambda d: d[:8] + _header(d)[1].replace(b'"F32"', b'"F64"') + d[8 + _header(d)[0]:], "its shape needs"),
    (lambda d: d[:8] + _header(d)[1].replace(b'"F32"', b'"XYZ"') + d[8 + _header(d)[0]:], "no valid dtype"),
])
def test_every_damage_is_one_error_naming_the_file(good, tmp_path, damage, message):
    path, _ = good
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as err:
        load_weights(bad)
    assert str(bad) in str(err.value)
