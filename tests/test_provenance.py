"""Provenance: C2PA Content Credentials on every generated PNG, the pixel watermark, the Tree-Ring key
statistics, and ``reverie verify``."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from reverie.provenance import credentials, pixelmark, read_png_parameters, save_png, treering
from reverie.provenance.verify import verify_image

c2pa = pytest.importorskip("c2pa")  # the provenance extra; the library works without it (tested below)

PARAMS = {"prompt": "a red circle", "num_images": 1, "sampler": "ddim", "steps": 4, "guidance": 4.0, "seed": 3,
          "model": "tiny", "model_hash": "0123456789abcdef"}
KEY = bytes(range(32))


@pytest.fixture(autouse=True)
def home(tmp_path_factory, monkeypatch):
    """Keys and certificates in a folder of this test module (made once, on first use)."""
    folder = tmp_path_factory.getbasetemp() / "reverie-home"
    monkeypatch.setenv("REVERIE_HOME", str(folder))
    monkeypatch.delenv("REVERIE_C2PA_CERT", raising=False)
    monkeypatch.delenv("REVERIE_C2PA_KEY", raising=False)
    return folder


def _image(size=32, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def _chunks(data: bytes):
    pos, out = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        out.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return out


def _png(chunks) -> bytes:
    body = b"".join(struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d)) for t, d in chunks)
    return b"\x89PNG\r\n\x1a\n" + body


def _swap_pixels(signed: bytes, image: Image.Image) -> bytes:
    """``signed`` with its image data replaced by ``image``'s (every other chunk, the manifest too, kept)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    new_idat = [d for t, d in _chunks(buf.getvalue()) if t == b"IDAT"]
    out, done = [], False
    for t, d in _chunks(signed):
        if t == b"IDAT":
            if not done:
                out += [(b"IDAT", d2) for d2 in new_idat]
                done = True
            continue
        out.append((t, d))
    return _png(out)


def test_every_png_carries_a_trusted_manifest_of_a_generated_image_and_keeps_its_parameters(tmp_path):
    path = tmp_path / "a.png"
    written = save_png(_image(), path, PARAMS)
    assert read_png_parameters(path) == written  # --from-png still reads the text chunk
    assert {k: written[k] for k in PARAMS} == PARAMS
    creds = credentials.read_credentials(path.read_bytes())
    assert creds.state == "Trusted" and not creds.problems
    (action,) = creds.assertion("c2pa.actions.v2")["actions"]
    assert action["action"] == "c2pa.created"
    assert action["digitalSourceType"].endswith("/trainedAlgorithmicMedia")
    assert action["parameters"]["model"] == "tiny" and action["parameters"]["model_hash"] == "0123456789abcdef"
    assert action["parameters"]["generation"]["prompt"] == "a red circle"
    assert (tmp_path / "a.png").stat().st_size < 20_000  # no C2PA thumbnail
    report = verify_image(path, key=KEY)
    assert report.checks["c2pa signature"].ok and report.checks["pixels match manifest"].ok
    assert report.checks["c2pa manifest"].ok


def test_tampered_pixels_and_a_lossless_resave_are_told_apart(tmp_path):
    path = tmp_path / "a.png"
    image = _image()
    save_png(image, path, PARAMS)
    signed = path.read_bytes()
    arr = np.asarray(image).copy()
    arr[5, 7, 0] ^= 1  # one pixel, one bit
    tampered = tmp_path / "tampered.png"
    tampered.write_bytes(_swap_pixels(signed, Image.fromarray(arr, "RGB")))
    report = verify_image(tampered, key=KEY)
    assert report.checks["c2pa signature"].ok is False
    assert "mismatch" in report.checks["c2pa signature"].detail
    assert report.checks["pixels match manifest"].ok is False
    # the same pixels compressed differently: the file's hash fails, the pixels still match
    resaved = tmp_path / "resaved.png"
    resaved.write_bytes(_swap_pixels(signed, image))
    assert resaved.read_bytes() != signed
    report = verify_image(resaved, key=KEY)
    assert report.checks["c2pa signature"].ok is False
    assert report.checks["pixels match manifest"].ok is True


def test_a_stripped_manifest_is_reported(tmp_path):
    path = tmp_path / "a.png"
    save_png(_image(), path, PARAMS)
    stripped = tmp_path / "stripped.png"
    stripped.write_bytes(_png([(t, d) for t, d in _chunks(path.read_bytes()) if t != b"caBX"]))
    assert read_png_parameters(stripped)["prompt"] == "a red circle"
    report = verify_image(stripped, key=KEY)
    assert report.checks["c2pa manifest"].ok is False
    assert "no C2PA manifest" in report.checks["c2pa manifest"].detail


def test_without_c2pa_images_still_save_and_verify_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(credentials, "c2pa_module", lambda: None)
    path = tmp_path / "a.png"
    with pytest.warns(UserWarning, match="c2pa-python is not installed"):
        save_png(_image(), path, PARAMS)
    assert read_png_parameters(path)["seed"] == 3
    check = verify_image(path, key=KEY).checks["c2pa manifest"]
    assert check.ok is None and "c2pa-python is not installed" in check.detail


def test_a_users_own_certificate_signs_and_a_foreign_anchor_does_not_trust_it(tmp_path, monkeypatch):
    own = tmp_path / "own"
    credentials.make_local_ca(own)
    monkeypatch.setenv("REVERIE_C2PA_CERT", str(own / "cert.pem"))
    monkeypatch.setenv("REVERIE_C2PA_KEY", str(own / "key.pem"))
    path = tmp_path / "a.png"
    save_png(_image(), path, PARAMS)
    assert credentials.read_credentials(path.read_bytes(), (own / "ca.pem").read_bytes()).state == "Trusted"
    other = tmp_path / "other"
    credentials.make_local_ca(other)
    untrusted = credentials.read_credentials(path.read_bytes(), (other / "ca.pem").read_bytes())
    assert untrusted.state == "Valid"  # signature fine, signer not chained to the given anchor
    assert any("untrusted" in p for p in untrusted.problems)


# ---- the pixel watermark ------------------------------------------------------------------------------------

def _render(size=256, index=0):
    from reverie.data.shapes import ShapesDataset
    from reverie.images import to_pil

    return to_pil(ShapesDataset(resolution=size, seed=5)[index]["image"][None])[0]


def test_pixel_watermark_is_faint_found_after_jpeg_75_and_absent_without_the_key():
    image = _render()
    marked = pixelmark.embed(image, KEY)
    diff = np.asarray(marked, float) - np.asarray(image, float)
    assert 10 * np.log10(255**2 / np.mean(diff**2)) > 38  # PSNR, dB
    assert pixelmark.detect(marked, KEY).p_value < 1e-6
    buf = io.BytesIO()
    marked.save(buf, "JPEG", quality=75)
    assert pixelmark.detect(Image.open(buf), KEY).p_value < 1e-6
    assert pixelmark.detect(marked, bytes(32)).p_value > 0.01   # another key
    assert pixelmark.detect(image, KEY).p_value > 0.01          # never marked


def test_pixel_watermark_p_values_are_calibrated_on_unmarked_images():
    """Under the null (images without the mark), P(p < alpha) <= alpha: Bonferroni is conservative."""
    pvals = [pixelmark.detect(_image(128, seed=s), bytes([s]) * 32).p_value for s in range(40)]
    assert sum(p < 0.05 for p in pvals) <= 6  # Binomial(40, 0.05): P(> 6) < 1.5 %


def test_save_png_marks_large_images_only_and_records_a_switched_off_mark(tmp_path, monkeypatch):
    monkeypatch.setenv("REVERIE_WATERMARK_KEY", KEY.hex())
    small = save_png(_image(32), tmp_path / "s.png", PARAMS)
    assert "watermark" not in small
    big = save_png(_render(), tmp_path / "b.png", PARAMS)
    assert big["watermark"]["pixel"]["scheme"] == pixelmark.SCHEME
    assert verify_image(tmp_path / "b.png").checks["pixel watermark"].ok
    off = save_png(_render(), tmp_path / "off.png", PARAMS, watermark=False)
    assert read_png_parameters(tmp_path / "off.png")["watermark"] == off["watermark"] == {"pixel": "off"}
    assert verify_image(tmp_path / "off.png").checks["pixel watermark"].ok is False


# ---- Tree-Ring: the key, the noise, the statistic --------------------------------------------------------------

SHAPE = (3, 32, 32)


def test_the_ring_is_an_orthogonal_projection_of_the_stated_dimension():
    ring = treering.TreeRing()
    x, y = torch.randn(2, *SHAPE, dtype=torch.float64)
    px = ring.project(x)
    assert torch.allclose(ring.project(px), px, atol=1e-12)                      # idempotent
    assert torch.allclose((px * y).sum(), (x * ring.project(y)).sum(), atol=1e-9)  # self-adjoint
    basis = torch.eye(32 * 32, dtype=torch.float64).view(-1, 32, 32)
    assert round(float(ring.project(basis).flatten(1).diagonal().sum())) * 3 == ring.dim(SHAPE)  # trace = rank
    assert not ring.mask(32, 32)[0, 0]  # no DC: brightness does not touch it


def test_watermarked_noise_keeps_everything_outside_the_ring_and_carries_the_key():
    ring = treering.TreeRing()
    noise = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(0))
    marked = ring.watermark(noise, KEY)
    assert torch.allclose(marked - ring.project(marked).float(), noise - ring.project(noise).float(), atol=1e-5)
    rho = ring.correlation(marked, KEY)
    assert torch.allclose(rho, torch.ones(8, dtype=torch.float64), atol=1e-6)
    assert (ring.correlation(noise, KEY).abs() < 0.35).all()
    assert treering.watermarked_noise((2, *SHAPE), 7, KEY).equal(treering.watermarked_noise((2, *SHAPE), 7, KEY))


def test_watermarked_noise_is_standard_gaussian():
    """Pooled over seeds, a key's noise passes a KS test against N(0, 1); its spectrum is flat outside the ring
    and, inside it (where one key fixes each coefficient), flat on average; over keys, its covariance is the
    identity."""
    from scipy.stats import kstest

    marked = treering.watermarked_noise((64, *SHAPE), 0, KEY).double()
    assert kstest(marked.flatten().numpy(), "norm").pvalue > 0.01
    power = (torch.fft.fft2(marked).abs() ** 2).mean(dim=(0, 1)) / (32 * 32)
    ring = treering.TreeRing().mask(32, 32)
    assert 0.7 < float(power[~ring].min()) and float(power[~ring].max()) < 1.4
    assert 0.75 < float(power[ring].mean()) < 1.25
    ring = treering.TreeRing()
    pixels = torch.stack([ring.watermark(torch.randn(1, *SHAPE), k.to_bytes(16, "little"))[0, :, 10, 10:14].flatten()
                          for k in range(400)]).double()
    cov = pixels.T @ pixels / len(pixels)
    assert (cov - torch.eye(12, dtype=torch.float64)).abs().max() < 0.25


@pytest.mark.parametrize("kind", ["gaussian", "image"])
def test_the_detection_statistic_follows_its_exact_null_and_the_threshold_gives_1_percent(kind):
    """rho of images not made with the key: the Beta law of the docstring (KS test), and the 1 % threshold
    passes about 1 % of them; for a structured 'image', over keys (the law is exact there whatever x' is)."""
    from scipy.stats import beta, kstest

    ring = treering.TreeRing()
    a = (ring.dim(SHAPE) - 1) / 2
    n = 3000
    if kind == "gaussian":
        x = torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        rho = ring.correlation(x, KEY)
    else:
        x = torch.linspace(-1, 1, 32).view(1, 1, 32).expand(1, 3, 32, 32).double() ** 3  # a smooth ramp
        rho = torch.cat([ring.correlation(x, k.to_bytes(16, "little")) for k in range(n)])
    assert kstest(((rho + 1) / 2).numpy(), beta(a, a).cdf).pvalue > 0.01
    passed = int((rho > ring.threshold(SHAPE, 0.01)).sum())
    assert 12 <= passed <= 52  # Binomial(3000, 0.01): mean 30, outside this range with probability < 0.1 %
    assert float(ring.p_value(ring.threshold(SHAPE, 0.01), SHAPE)) == pytest.approx(0.01, rel=1e-6)


# ---- the CLI: generate writes watermarked, signed PNGs; verify reads them -----------------------------------

@pytest.fixture(scope="module")
def text_model(make_model_dir):
    from helpers import RGB16, TEXT_MODEL

    return make_model_dir("tiny-t2i", TEXT_MODEL, RGB16)


def test_generate_then_verify_and_no_watermark_is_recorded(text_model, tmp_path, capsys):
    from reverie.cli import main

    a = tmp_path / "a.png"
    common = ["--model", str(text_model), "--steps", "3", "--num-images", "1"]
    assert main(["generate", "a red circle", *common, "-o", str(a)]) == 0
    marks = read_png_parameters(a)["watermark"]
    assert marks["noise"]["scheme"] == treering.SCHEME and len(marks["noise"]["key_id"]) == 16
    capsys.readouterr()
    assert main(["verify", str(a), "--no-tree-ring"]) == 0
    out = capsys.readouterr().out
    assert "c2pa signature         yes  Trusted" in out and "pixels match manifest  yes" in out
    off = tmp_path / "off.png"
    assert main(["generate", "a red circle", *common, "--no-watermark", "-o", str(off)]) == 0
    assert read_png_parameters(off)["watermark"] == "off"
    assert credentials.read_credentials(off.read_bytes()).state == "Trusted"
    assert Image.open(off).tobytes() != Image.open(a).tobytes()  # the watermark changed the noise
    again = tmp_path / "again.png"  # --from-png keeps it off
    assert main(["generate", "--from-png", str(off), "--model", str(text_model), "-o", str(again)]) == 0
    assert Image.open(again).tobytes() == Image.open(off).tobytes()
    tampered = tmp_path / "t.png"
    tampered.write_bytes(_swap_pixels(a.read_bytes(), Image.eval(Image.open(a), lambda v: 255 - v)))
    capsys.readouterr()
    assert main(["verify", str(tampered), "--no-tree-ring"]) == 1
    assert "pixels match manifest  NO" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "missing.png")]) == 2


def test_verify_inverts_each_image_of_a_grid_and_tests_the_key(text_model, tmp_path, monkeypatch):
    """The wiring of the Tree-Ring check: a grid is cut into its images, each resized to the model and inverted
    (here by a stand-in that returns the noise the image was made from: an exact inversion), and the key is
    found in the watermarked grid and not in the plain one. How well the real inversion does is measured by
    benchmarks/watermark.py."""
    import reverie.editing
    from reverie.cli import main
    from reverie.pipeline import Pipeline
    from reverie.provenance import watermark_noise

    monkeypatch.setenv("REVERIE_WATERMARK_KEY", KEY.hex())
    pipe = Pipeline.from_pretrained(text_model)
    made = {}

    def exact_inversion(model, images, prompt="", **settings):
        assert images.shape == (3, 3, 16, 16) and prompt == ""
        return type("Inversion", (), {"noise": made["noise"]})

    monkeypatch.setattr(reverie.editing, "invert", exact_inversion)
    for flag, found in (([], True), (["--no-watermark"], False)):
        out = tmp_path / f"grid{len(flag)}.png"
        assert main(["generate", "a red circle", "--model", str(text_model), "--steps", "2", "--num-images", "3",
                     "-o", str(out), *flag]) == 0
        noise, _ = watermark_noise(pipe, 3, 0, enabled=True, key=KEY)
        made["noise"] = noise if found else torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        check = verify_image(out, model=pipe).checks["tree-ring watermark"]
        assert check.ok is found and check.detail.startswith("found" if found else "not found")
        assert len(check.data["rho"]) == 3 and (min(check.data["rho"]) > 0.999 if found else True)


def test_sample_signs_every_png_and_records_its_watermark(text_model, tmp_path):
    from reverie.cli import main

    assert main(["sample", str(text_model), "--n", "3", "--batch-size", "2", "--steps", "2",
                 "--out-dir", str(tmp_path / "each")]) == 0
    files = sorted((tmp_path / "each").glob("*.png"))
    assert len(files) == 3
    for i, f in enumerate(files):
        params = read_png_parameters(f)
        assert params["index"] == i and params["seed"] == i // 2  # batch k uses seed + k
        assert params["watermark"]["noise"]["scheme"] == treering.SCHEME
        assert credentials.read_credentials(f.read_bytes()).state == "Trusted"
