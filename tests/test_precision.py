"""The bf16 default (reverie.precision) and the CPU fast paths it relies on: the channels-last GroupNorm + SiLU,
the cheaper dropout mask and matmul attention, each against PyTorch's own implementation."""

import pytest
import torch
import torch.nn.functional as F

from reverie.nets.layers import Dropout, GroupNorm, attention
from reverie.precision import cpu_has_fast_bf16, precision_dtype, resolve_precision


def test_resolve_precision(monkeypatch):
    monkeypatch.delenv("REVERIE_PRECISION", raising=False)
    expected = "bf16" if cpu_has_fast_bf16() else "fp32"
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("auto", "meta") == "fp32"  # not a CPU: float32 unless asked
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    monkeypatch.setenv("REVERIE_PRECISION", "bf16")
    assert resolve_precision("auto", "cpu") == "bf16" and resolve_precision("fp32") == "fp32"
    assert precision_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("half")
    monkeypatch.setenv("REVERIE_PRECISION", "int8")
    with pytest.raises(ValueError, match="REVERIE_PRECISION"):
        resolve_precision("auto")


def _reference(x, gn, scale, shift, act):
    y = F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)
    if scale is not None:
        y = y * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return F.silu(y) if act else y


@pytest.mark.parametrize("adagn", [False, True])
@pytest.mark.parametrize("act", [False, True])
def test_channels_last_group_norm_matches_native(adagn, act):
    """Output and every gradient (input, weight, bias, AdaGN scale and shift) in float64, to rounding."""
    torch.manual_seed(0)
    gn = GroupNorm(4, 16).double()
    torch.nn.init.normal_(gn.weight)
    torch.nn.init.normal_(gn.bias)
    x = (torch.randn(3, 16, 5, 4, dtype=torch.float64) * 2 + 1).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    scale = torch.randn(3, 16, dtype=torch.float64, requires_grad=True) if adagn else None
    shift = torch.randn(3, 16, dtype=torch.float64, requires_grad=True) if adagn else None
    inputs = [t for t in (x, gn.weight, gn.bias, scale, shift) if t is not None]
    ours = gn.silu(x, scale, shift, act=act)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    ref = _reference(x, gn, scale, shift, act)
    g = torch.randn_like(ref)
    for a, b in zip((ours, *torch.autograd.grad(ours, inputs, g)), (ref, *torch.autograd.grad(ref, inputs, g))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_channels_last_group_norm_bf16_close():
    torch.manual_seed(0)
    gn = GroupNorm(8, 64)
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    ref = F.silu(gn(x.contiguous()))
    out = gn.silu(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 1e-2


def test_dropout_rate_scale_and_gradient():
    torch.manual_seed(0)
    layer = Dropout(0.25).train()
    x = torch.randn(8, 32, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    dropped = y == 0
    assert abs(dropped.float().mean().item() - 0.25) < 0.01  # 65,536 draws: std 0.0017
    kept_scale = (y[~dropped] / x[~dropped]).detach()
    torch.testing.assert_close(kept_scale, torch.full_like(kept_scale, 65536 / (65536 - 16384)))
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(g, (~dropped).float() * 4 / 3)
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(1)
    assert torch.equal(a, layer(x))  # the global generator decides, as for nn.Dropout
    assert torch.equal(layer.eval()(x), x)


@pytest.mark.parametrize("grad", [False, True])
def test_matmul_attention_matches_sdpa(grad):
    """Small maps take the matmul path on the CPU; same function as SDPA, with a padding mask and causally."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, dtype=torch.float64, requires_grad=grad) for _ in range(3))
    mask = torch.rand(2, 1, 1, 16) > 0.3
    mask[..., 0] = True
    with torch.set_grad_enabled(grad):
        for kwargs in ({}, {"attn_mask": mask}, {"is_causal": True}):
            torch.testing.assert_close(attention(q, k, v, **kwargs), F.scaled_dot_product_attention(q, k, v, **kwargs))


@pytest.mark.parametrize("shape", [(2, 3, 300, 200, 40), (1, 2, 70, 1500, 33), (2, 1, 129, 129, 64)])
def test_chunked_attention_is_attention(shape):
    """Per head and query chunk, padded values (d not a multiple of 16), chunks that do not divide N, cross-
    attention (L != N), queries that are a transposed view: SDPA's function to float64 rounding."""
    from reverie.nets.layers import chunked_attention

    B, H, N, L, d = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, N, H, d, generator=g, dtype=torch.float64).transpose(1, 2)
    k, v = (torch.randn(B, H, L, d, generator=g, dtype=torch.float64) for _ in range(2))
    out = chunked_attention(q, k, v, max_scores=64 * L)  # chunks of 64 queries
    assert out.shape == (B, H, N, d)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-12, atol=1e-12)


def test_bf16_inference_attention_takes_the_chunked_path_only_where_chosen(monkeypatch):
    """Long unmasked bf16 maps at inference take chunked_attention when the CPU calls for it (no AMX, or
    REVERIE_CPU_ATTENTION=chunked); training, masks, causal maps, float32 and short maps do not; its bf16
    error against float64 stays at bf16 rounding."""
    import reverie.nets.layers as layers

    calls = []
    real = layers.chunked_attention
    monkeypatch.setattr(layers, "chunked_attention", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 40, generator=g, dtype=torch.float64) for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    monkeypatch.setenv(layers.CPU_ATTENTION_ENV, "chunked")
    out = layers.attention(qb, kb, vb)
    assert calls == [(1, 2, 256, 40)]
    assert float((out.double() - exact).norm() / exact.norm()) < 1e-2
    layers.attention(qb[:, :, :128], kb[:, :, :128], vb[:, :, :128])  # 128 x 128: below CHUNKED_ATTENTION_MIN
    layers.attention(qb, kb, vb, is_causal=True)
    layers.attention(qb, kb, vb, attn_mask=torch.ones(1, 1, 1, 256, dtype=torch.bool))
    layers.attention(q, k, v)  # float64 (and float32) keep SDPA's accuracy
    with torch.enable_grad():
        layers.attention(qb.requires_grad_(), kb, vb)
    assert len(calls) == 1
    with monkeypatch.context() as m:  # under torch.compile: SDPA, one graph node instead of unrolled loops
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        layers.attention(qb.detach(), kb, vb)
    assert len(calls) == 1
    monkeypatch.setenv(layers.CPU_ATTENTION_ENV, "sdpa")
    layers.attention(qb.detach(), kb, vb)
    assert len(calls) == 1
    monkeypatch.setenv(layers.CPU_ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="REVERIE_CPU_ATTENTION must be sdpa or chunked"):
        layers.attention(qb.detach(), kb, vb)
    monkeypatch.delenv(layers.CPU_ATTENTION_ENV)
    for flags, kind in (({"avx512_bf16"}, "chunked"), ({"avx512_bf16", "amx_bf16"}, "sdpa"), (set(), "sdpa")):
        monkeypatch.setattr("reverie.precision.cpu_flags", lambda flags=flags: frozenset(flags))
        assert layers.cpu_attention_kind() == kind


def test_pipeline_bf16_close_to_fp32(make_model_dir):
    """A text model in bf16: only its U-Net changes dtype and layout; samples stay float32 and close."""
    from helpers import RGB16, TEXT_MODEL
    from reverie.pipeline import Pipeline

    path = make_model_dir("t2i", TEXT_MODEL, RGB16)
    fp32 = Pipeline.from_pretrained(path, precision="fp32")
    bf16 = Pipeline.from_pretrained(path, precision="bf16")
    weight = bf16.net.net.conv_in.weight
    assert bf16.precision == "bf16" and weight.dtype == torch.bfloat16
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert all(p.dtype == torch.float32 for p in bf16.net.encoder.parameters())
    x, sigma = torch.randn(2, 3, 16, 16) * 2, torch.tensor([2.0, 0.5])
    cond = fp32.net.encode(["a red circle", ""])
    a, b = fp32.denoiser(x, sigma, **cond), bf16.denoiser(x, sigma, **cond)
    assert b.dtype == torch.float32
    assert (a - b).norm() / a.norm() < 2e-2
    assert bf16.sample(1, steps=2, prompts=["a red circle"]).dtype == torch.float32


def test_pipeline_compile_in_place(make_model_dir, monkeypatch):
    """Pipeline.compile hands the U-Net (not the text encoder) to torch.compile in place: same parameter names,
    weights and hash, the same samples. A recording backend stands in for inductor (whose kernels take tens of
    seconds to build; benchmarks/generate_speed.py compares inductor's images with eager ones)."""
    import shutil

    from helpers import RGB16, TEXT_MODEL
    from reverie.pipeline import Pipeline

    path = make_model_dir("t2i-compile", TEXT_MODEL, RGB16)
    eager = Pipeline.from_pretrained(path, precision="fp32")
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    pipe = Pipeline.from_pretrained(path, precision="fp32").compile(backend=recording)
    assert pipe.compiled == "recording" and eager.compiled == ""
    assert list(pipe.net.state_dict()) == list(eager.net.state_dict()) and pipe.weights_hash == eager.weights_hash
    torch._dynamo.reset()
    from reverie.nets.layers import SUBPIXEL_ENV

    monkeypatch.setenv(SUBPIXEL_ENV, "0")  # compiled graphs trace the textbook upsampling (layers.subpixel_applies)
    a = eager.sample(2, steps=3, prompts=["a red circle", "a blue square"], seed=1)
    b = pipe.sample(2, steps=3, prompts=["a red circle", "a blue square"], seed=1)
    assert graphs, "the U-Net did not go through torch.compile"
    assert all("encoder" not in str(n.target) for g in graphs for n in g.graph.nodes)
    torch.testing.assert_close(a, b)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="needs a C.. compiler"):
        Pipeline.from_pretrained(path, precision="fp32", compile=True)


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="the bf16 default applies to CPUs with bf16 matrix units")
def test_auto_precision_trains_bf16_channels_last_and_resumes_exactly(tmp_path, monkeypatch, request):
    """``mixed_precision: auto`` on this CPU: bf16 autocast, channels_last weights, dropout, fused AdamW, EMA;
    4 steps + resume + 4 steps give the bytes of 8 straight steps, and a rerun gives them again."""
    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    from helpers import NET
    from reverie.configs import load_config
    from reverie.train import train
    from reverie.train.config import TrainConfig
    from reverie.train.run import run_precision, use_channels_last
    from test_trainer import TINY
    from toy_data import Toy

    monkeypatch.delenv("REVERIE_PRECISION")
    # accelerate keeps one process-wide state: leave none behind in bf16 for the float32 tests that follow
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))

    def cfg(out, steps):
        net = NET.replace("}", ", dropout: 0.1}")
        return load_config(TrainConfig, None, [*TINY, f"--model.network_overrides={net}", f"--train.out_dir={out}",
                                               f"--train.steps={steps}", "--train.checkpoint_every=4"])

    assert run_precision(cfg(tmp_path, 1)) == "bf16" and use_channels_last(cfg(tmp_path, 1))
    weights = []
    for name, parts in (("straight", [8]), ("again", [8]), ("resumed", [4, 8])):
        for steps in parts:
            result = train(cfg(tmp_path / name, steps), resume="auto", dataset=Toy(40))
        assert result.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        weights.append([load_file(str(tmp_path / name / "model" / f"{kind}.safetensors")) for kind in ("model", "ema")])
    for other in weights[1:]:
        for a, b in zip(weights[0], other):
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_bf16_run_after_a_float32_run_in_the_same_process(tmp_path, request):
    """accelerate keeps one process-wide state and refuses a second precision; a single process (a notebook,
    a test worker, the distillation trainer after a float32 one) must still be able to train in both."""
    from accelerate.state import AcceleratorState

    from reverie.configs import load_config
    from reverie.train import train
    from reverie.train.config import TrainConfig
    from test_trainer import TINY
    from toy_data import Toy

    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    for precision in ("no", "bf16", "no"):
        cfg = load_config(TrainConfig, None, [*TINY, f"--train.out_dir={tmp_path / precision}", "--train.steps=1",
                                              f"--train.mixed_precision={precision}"])
        train(cfg, dataset=Toy(8))
        assert AcceleratorState().mixed_precision == precision
