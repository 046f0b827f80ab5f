"""Networks: shapes, exact zero init, determinism, masks, checkpointing, conditioning, presets, compile,
and equality with diffusers' UNet2DModel (a test-only reference) under converted weights."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from reverie.nets import PRESETS, DiTConfig, UNetConfig, count_parameters, create_network
from reverie.nets.dit import sincos_pos_embed_2d
from reverie.nets.unet import convert_diffusers_unet2d, diffusers_unet2d_kwargs

# Pinned parameter counts. unet-ddpm-cifar10 equals diffusers' UNet2DModel for the same config
# (checked below); DiT counts exclude the fixed positional buffer and match Peebles & Xie 2023
# (S/2 33M, B/2 130M, XL/2 675M with the 256 x width positional table added).
PINNED = {
    "unet-tiny": 1_192_387,
    "unet-small": 9_593_539,
    "unet-ddpm-cifar10": 35_746_307,
    "video-unet-tiny": 1_368_803,
    "dit-tiny": 706_672,
    "dit-s-2": 32_865_056,
    "dit-b-2": 130_315_808,
    "dit-xl-2": 674_834_720,
}
PAPER_DIT = {"dit-s-2": 33.0e6, "dit-b-2": 130.5e6, "dit-xl-2": 675e6}


def perturb(net, seed=0, scale=0.05):
    """Add noise to every parameter so zero-initialized layers stop hiding the conditioning."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return net


def inputs(shape, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=g), torch.tensor([3.5, 812.0])[:batch]


def tiny(name, **overrides):
    torch.manual_seed(0)
    return create_network(name, **overrides)


# --------------------------------------------------------------------------- presets and configs

@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_count_pinned(name):
    with torch.device("meta"):
        net = create_network(name)
    assert count_parameters(net) == PINNED[name]
    if name in PAPER_DIT:  # within 0.5% of the paper's table once the positional table is counted
        total = PINNED[name] + net.pos_embed.numel()
        assert abs(total - PAPER_DIT[name]) / PAPER_DIT[name] < 5e-3


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_output_shape_on_meta(name):
    with torch.device("meta"):
        net = create_network(name)
        cfg = net.config
        size = cfg.sample_size if isinstance(cfg, UNetConfig) else cfg.input_size
        x = torch.empty(2, cfg.in_channels, size, size)
        cond = {"class_labels": torch.zeros(2, dtype=torch.long)} if cfg.num_classes else {}
        out = net(x, torch.empty(2), **cond)
    assert out.shape == (2, cfg.resolved_out_channels, size, size)


def test_ddpm_cifar10_count_equals_diffusers():
    diffusers = pytest.importorskip("diffusers")
    cfg = PRESETS["unet-ddpm-cifar10"]
    with torch.device("meta"):
        ref = diffusers.UNet2DModel(**diffusers_unet2d_kwargs(cfg))
    assert count_parameters(ref) == PINNED["unet-ddpm-cifar10"] == 35_746_307


@pytest.mark.parametrize("name", ["unet-small", "dit-s-2"])
def test_config_round_trips_through_json(name):
    cfg = PRESETS[name].replace(context_dim=32, pooled_dim=16)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert type(cfg).from_dict(d) == cfg
    with torch.device("meta"):
        a, b = create_network(d), create_network(cfg)
    assert a.config == cfg and [k for k, _ in a.named_parameters()] == [k for k, _ in b.named_parameters()]


def test_unknown_names_raise_value_errors_listing_choices():
    with pytest.raises(ValueError, match="unet-tiny.*dit-s-2"):
        create_network("unet-huge")
    with pytest.raises(ValueError, match="model_channels"):
        create_network("unet-tiny", n_channels=3)
    with pytest.raises(ValueError, match="sinusoidal, fourier"):
        UNetConfig(time_embedding="gaussian")
    with pytest.raises(ValueError, match="valid: 32, 16, 8"):
        UNetConfig(channel_mult=(1, 2, 2), attention_resolutions=(4,))
    with pytest.raises(ValueError, match="unet, dit"):
        create_network({"arch": "resnet"})
    with pytest.raises(ValueError, match="patch_size"):
        DiTConfig(input_size=31)


def test_bad_inputs_raise_value_errors():
    net = tiny("unet-tiny")
    t = torch.zeros(1)
    with pytest.raises(ValueError, match="divisible"):
        net(torch.zeros(1, 3, 30, 30), t)
    with pytest.raises(ValueError, match="class_labels"):
        net(torch.zeros(1, 3, 32, 32), t, class_labels=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="context"):
        tiny("unet-tiny", context_dim=8)(torch.zeros(1, 3, 32, 32), t)
    with pytest.raises(ValueError, match="pooled"):
        tiny("dit-tiny", pooled_dim=8)(torch.zeros(1, 4, 32, 32), t)


# --------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("overrides, shape, out_channels", [
    ({}, (3, 32, 32), 3),
    ({}, (3, 16, 24), 3),
    ({"learned_variance": True}, (3, 8, 8), 6),
    ({"learned_variance": True, "out_channels": 1}, (3, 8, 8), 2),
    ({"in_channels": 1, "time_embedding": "fourier", "resample_with_conv": False}, (1, 20, 12), 1),
    ({"dims": 1, "in_channels": 2}, (2, 64), 2),
    ({"dims": 3, "channels_last": True}, (3, 3, 8, 12), 3),  # (C, frames, H, W): frames are not resampled
])
def test_unet_output_shapes(overrides, shape, out_channels):
    net = tiny("unet-tiny", **overrides)
    x, t = inputs(shape)
    assert net(x, t).shape == (2, out_channels, *shape[1:])


@pytest.mark.parametrize("overrides, shape, out_channels", [
    ({}, (4, 32, 32), 4),
    ({"learned_variance": True}, (4, 16, 24), 8),
    ({"patch_size": 4, "in_channels": 3, "out_channels": 2}, (3, 32, 32), 2),
])
def test_dit_output_shapes(overrides, shape, out_channels):
    net = tiny("dit-tiny", **overrides)
    x, t = inputs(shape)
    assert net(x, t).shape == (2, out_channels, *shape[1:])


def test_dit_pos_embed_is_sincos_of_row_and_column():
    pe = sincos_pos_embed_2d(3, 5, 8)  # dim/4 = 2 frequencies per axis: 1 and 10000^(-1/2) = 1/100
    row, col = 2.0, 4.0
    expect = torch.tensor([f(p * w) for p in (row, col) for f in (math.sin, math.cos) for w in (1.0, 0.01)])
    torch.testing.assert_close(pe[2 * 5 + 4], expect)


# --------------------------------------------------------------------------- init and determinism

@pytest.mark.parametrize("name, shape", [("unet-tiny", (3, 16, 16)), ("dit-tiny", (4, 16, 16))])
def test_zero_init_gives_exactly_zero_output(name, shape):
    net = tiny(name, num_classes=5, pooled_dim=6, context_dim=7)
    x, t = inputs(shape)
    cond = dict(class_labels=torch.tensor([1, 3]), pooled=torch.randn(2, 6), context=torch.randn(2, 4, 7))
    out = net(x, t, **cond)
    assert out.abs().max().item() == 0.0


def test_dit_blocks_start_as_identity():
    net = tiny("dit-tiny", context_dim=8)
    tokens, c = torch.randn(2, 10, 96), torch.randn(2, 96)
    for block in net.blocks:
        assert torch.equal(block(tokens, c, torch.randn(2, 3, 8), None), tokens)


@pytest.mark.parametrize("name, shape", [("unet-tiny", (3, 16, 16)), ("dit-tiny", (4, 16, 16))])
def test_same_seed_same_bytes(name, shape):
    outs = []
    for _ in range(2):
        net = perturb(tiny(name, **({"dropout": 0.1} if name.startswith("unet") else {})))
        x, t = inputs(shape)
        torch.manual_seed(1)  # dropout masks
        outs.append(net.train()(x, t))
    assert torch.equal(outs[0], outs[1])
    other = perturb(create_network(name), seed=0)  # different init seed -> different function
    assert not torch.equal(other(x, t), outs[0])


# --------------------------------------------------------------------------- conditioning

@pytest.mark.parametrize("name, shape", [("unet-tiny", (3, 16, 16)), ("dit-tiny", (4, 16, 16))])
def test_cross_attention_mask(name, shape):
    net = perturb(tiny(name, context_dim=8)).eval()
    x, t = inputs(shape)
    g = torch.Generator().manual_seed(3)
    context = torch.randn(2, 6, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    base = net(x, t, context=context, context_mask=mask)
    padded = context.clone()
    padded[~mask] = 100 * torch.randn(int((~mask).sum()), 8, generator=g)
    torch.testing.assert_close(net(x, t, context=padded, context_mask=mask), base, rtol=0, atol=1e-6)
    real = context.clone()
    real[0, 1] += 1.0  # a real token of sample 0 only
    diff = (net(x, t, context=real, context_mask=mask) - base).abs().flatten(1).amax(1)
    assert diff[0] > 1e-3 and diff[1] == 0
    # no real token at all: finite, and the context no longer matters
    empty = torch.zeros_like(mask)
    a, b = net(x, t, context=context, context_mask=empty), net(x, t, context=padded, context_mask=empty)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, shape", [("unet-tiny", (3, 16, 16)), ("dit-tiny", (4, 16, 16))])
def test_class_and_pooled_conditioning_change_output(name, shape):
    net = tiny(name, num_classes=4, pooled_dim=5)
    x, t = inputs(shape)
    pooled = torch.randn(2, 5)
    zero = net(x, t, class_labels=torch.tensor([0, 1]), pooled=pooled)
    assert zero.abs().max() == 0  # zero init hides the conditioning ...
    perturb(net)
    base = net(x, t, class_labels=torch.tensor([0, 1]), pooled=pooled)
    other_class = net(x, t, class_labels=torch.tensor([2, 1]), pooled=pooled)
    other_pooled = net(x, t, class_labels=torch.tensor([0, 1]), pooled=pooled + 1)
    d_class = (other_class - base).abs().flatten(1).amax(1)
    assert d_class[0] > 1e-3 and d_class[1] == 0  # ... until perturbed; only sample 0 changed label
    assert (other_pooled - base).abs().max() > 1e-3


@pytest.mark.parametrize("name, shape", [("unet-tiny", (3, 16, 16)), ("dit-tiny", (4, 16, 16))])
def test_time_input_changes_output(name, shape):
    net = perturb(tiny(name))
    x, _ = inputs(shape)
    a, b = net(x, torch.tensor([10.0, 10.0])), net(x, torch.tensor([10.0, 500.0]))
    d = (a - b).abs().flatten(1).amax(1)
    assert d[0] == 0 and d[1] > 1e-3


# --------------------------------------------------------------------------- training-time options

@pytest.mark.parametrize("name, shape, overrides", [
    ("unet-tiny", (3, 16, 16), {"dropout": 0.2, "context_dim": 8}),
    ("dit-tiny", (4, 16, 16), {"context_dim": 8}),
])
def test_gradient_checkpointing_gives_same_gradients(name, shape, overrides):
    grads = []
    for ckpt in (False, True):
        net = perturb(tiny(name, **overrides)).train()
        net.set_gradient_checkpointing(ckpt)
        x, t = inputs(shape)
        context = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(5))
        torch.manual_seed(7)  # same dropout masks, also when the checkpoint recomputes
        net(x, t, context=context).square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in net.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


def test_channels_last_computes_the_same_function():
    ref = perturb(tiny("unet-tiny", context_dim=8))
    net = tiny("unet-tiny", context_dim=8, channels_last=True)
    net.load_state_dict(ref.state_dict())
    assert net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x, t = inputs((3, 16, 16))
    context = torch.randn(2, 3, 8)
    out = net(x, t, context=context)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref(x, t, context=context), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, shape", [("unet-tiny", (3, 16, 16)), ("dit-tiny", (4, 16, 16))])
def test_bf16_autocast_close_to_fp32(name, shape):
    net = perturb(tiny(name)).eval()
    x, t = inputs(shape)
    ref = net(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t)
    err = (out.float() - ref).norm() / ref.norm()
    assert out.dtype == torch.bfloat16 and err < 3e-2


@pytest.mark.parametrize("name, shape, overrides, bf16", [
    ("unet-tiny", (3, 16, 16), {"context_dim": 8, "num_classes": 3, "channels_last": True}, False),
    ("unet-tiny", (3, 16, 16), {"context_dim": 8, "num_classes": 3}, True),  # GroupNorm's autocast branch
    ("dit-tiny", (4, 16, 16), {"context_dim": 8, "num_classes": 3}, False),
])
def test_compile_fullgraph_without_graph_breaks(name, shape, overrides, bf16):
    dynamo = pytest.importorskip("torch._dynamo")
    dynamo.reset()
    net = perturb(tiny(name, **overrides)).eval()
    x, t = inputs(shape)
    cond = dict(context=torch.randn(2, 3, 8), context_mask=torch.tensor([[1, 1, 0], [1, 0, 0]]).bool(),
                class_labels=torch.tensor([0, 2]))
    # backend="eager": dynamo must capture the whole forward (fullgraph raises on any graph break);
    # code generation is exercised by the benchmark's compile mode and the slow test below.
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        torch.testing.assert_close(compiled(x, t, **cond), net(x, t, **cond))


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    """Inductor code generation (minutes of C++ compilation on a shared CPU, hence slow)."""
    pytest.importorskip("torch._inductor")
    net = perturb(tiny("unet-tiny")).eval()
    x, t = inputs((3, 16, 16))
    compiled = torch.compile(net, fullgraph=True)
    torch.testing.assert_close(compiled(x, t), net(x, t), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- diffusers as the reference

@pytest.mark.parametrize("overrides", [
    {"scale_shift": False},                                        # DDPM: embedding added before norm2
    {"mid_attention": False, "num_classes": 4},                    # AdaGN + class embedding
    {"scale_shift": False, "learned_variance": True, "channels_last": True, "head_channels": 16},
])
def test_unet_equals_diffusers_unet2d_with_converted_weights(overrides, monkeypatch):
    """Same layers, same function: diffusers' UNet2DModel weights loaded into reverie's U-Net give the
    same output (and, with upsampling in the textbook order, as when training, the same FLOPs), so the speed
    comparison in benchmarks/networks.py is fair. In inference the sub-pixel upsampling convs do fewer."""
    diffusers = pytest.importorskip("diffusers")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    net = tiny("unet-tiny", **overrides).eval()
    torch.manual_seed(1)
    ref = diffusers.UNet2DModel(**diffusers_unet2d_kwargs(net.config)).eval()
    net.load_state_dict(convert_diffusers_unet2d(ref.state_dict(), net.config), strict=True)
    assert count_parameters(net) == count_parameters(ref)
    x, t = inputs((3, 16, 16))
    cond = {"class_labels": torch.tensor([1, 3])} if net.config.num_classes else {}
    from reverie.nets.layers import SUBPIXEL_ENV

    def run(fn):
        # math SDPA: attention as counted matmuls (the CPU flash kernel has no FLOP formula)
        with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            out = fn()
        return out, counter.get_total_flops()

    ours, ours_flops = run(lambda: net(x, t, **cond))
    theirs, their_flops = run(lambda: ref(x, t, **cond).sample)
    monkeypatch.setenv(SUBPIXEL_ENV, "0")
    textbook, textbook_flops = run(lambda: net(x, t, **cond))
    for out in (ours, textbook):
        torch.testing.assert_close(out, theirs, rtol=1e-5, atol=1e-5)
    assert textbook_flops == their_flops
    assert ours_flops < their_flops


def test_position_embedding_nd_and_fractional():
    from reverie.nets.layers import sincos_position_embedding

    # 1-D, integer positions: channel k < C/2 is sin(i * w_k), then cos, w_k = 10000^(-k / (C/2)).
    pe = sincos_position_embedding((5,), 4)
    torch.testing.assert_close(pe[3], torch.tensor([math.sin(3.0), math.sin(0.03), math.cos(3.0), math.cos(0.03)]))
    # Fractional coordinates (2-D, extent 32): cell (i, j) of an n x n grid is coded at ((i + .5) / n * 32,
    # (j + .5) / n * 32), image coordinates, so a point keeps its code across resolutions.
    fine = sincos_position_embedding((16, 16), 8, extent=32.0)
    y, x = (2 + 0.5) / 16 * 32, (7 + 0.5) / 16 * 32
    expect = [f(p * w) for p in (y, x) for f in (math.sin, math.cos) for w in (1.0, 0.01)]
    torch.testing.assert_close(fine[2 * 16 + 7], torch.tensor(expect))
    coarse = sincos_position_embedding((8, 8), 8, extent=32.0)  # cell (1, 3) of 8 is centred at (6, 14)
    expect = [f(p * w) for p in (6.0, 14.0) for f in (math.sin, math.cos) for w in (1.0, 0.01)]
    torch.testing.assert_close(coarse[1 * 8 + 3], torch.tensor(expect))
    with pytest.raises(ValueError, match="divisible by 6"):
        sincos_position_embedding((2, 2, 2), 8)


def test_attention_positions_break_translation_symmetry():
    """Without positions, self-attention is permutation-equivariant: a constant input gives the same output
    at every position of the attention block. With them, positions differ."""
    from reverie.nets.layers import AttentionBlock

    outputs = []
    for positions in (False, True):
        torch.manual_seed(0)
        block = AttentionBlock(16, 2, 4, context_dim=8, positions=positions)
        for p in block.parameters():  # undo the zero init so the attention output is visible
            torch.nn.init.normal_(p, std=0.2)
        x = torch.randn(1, 16, 1, 1).expand(1, 16, 6, 6).contiguous()
        with torch.no_grad():
            outputs.append(block(x, torch.randn(1, 3, 8)))
    flat_without, flat_with = (o.flatten(2) for o in outputs)
    assert (flat_without - flat_without[..., :1]).abs().max() < 1e-5
    assert (flat_with - flat_with[..., :1]).abs().max() > 1e-2
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(16,), sample_size=32,
                     attention_positions=True)
    with pytest.raises(ValueError, match="attention_positions"):
        diffusers_unet2d_kwargs(cfg)
    assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).attention_positions


# --------------------------------------------------------------------------- sub-pixel upsampling


def _textbook_upsample(up, x):
    return up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize("channels_last", [False, True])
def test_subpixel_upsample_is_the_nearest_upsample_then_conv(channels_last):
    """upsample_conv's 2x2 convolution over x is the same linear map as nearest 2x then the 3x3 conv: equal in
    float64 to rounding, borders included (odd, non-square sides, a batch, a bias)."""
    from reverie.nets.layers import Upsample

    torch.manual_seed(0)
    up = Upsample(2, 12, use_conv=True).double()
    x = torch.randn(2, 12, 5, 7, dtype=torch.float64)
    if channels_last:
        up, x = up.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got, want = up(x), _textbook_upsample(up, x)
    assert got.shape == want.shape == (2, 12, 10, 14)
    assert (got - want).abs().max() < 1e-12 * want.abs().max()
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_subpixel_upsample_in_bf16_packed_rounds_like_the_textbook_order():
    """bf16, channels_last, packed weights (the SD path on the CPU): as far from the float64 map as the textbook
    bf16 order is (the folded kernels add one rounding)."""
    from reverie.nets.layers import Upsample
    from reverie.nets.packing import pack_weights

    torch.manual_seed(1)
    exact = Upsample(2, 32, use_conv=True).double()
    x64 = torch.randn(1, 32, 8, 8, dtype=torch.float64)
    up = Upsample(2, 32, use_conv=True)
    up.load_state_dict(exact.state_dict())
    up = up.bfloat16().to(memory_format=torch.channels_last)
    assert pack_weights(up) == 1
    x = x64.bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        truth = _textbook_upsample(exact, x.double())  # the bf16 input, exactly
        got, textbook = up(x), _textbook_upsample(up, x)

    def rel(a):
        return float((a.double() - truth).norm() / truth.norm())

    assert rel(got) < 1.5 * rel(textbook) + 1e-4
    assert rel(got) < 1e-2


def test_subpixel_upsample_follows_weight_changes_and_keeps_gradients_textbook():
    """The folded kernels are rebuilt when the conv's weights are written; with gradients wanted the layer runs
    the textbook ops (bit for bit) and gradients flow."""
    from reverie.nets.layers import Upsample

    torch.manual_seed(2)
    up = Upsample(2, 6, use_conv=True).double()
    x = torch.randn(1, 6, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        first = up(x)
        up.conv.weight.mul_(-2.0)
        up.conv.bias.add_(1.0)
        second = up(x)
        want = _textbook_upsample(up, x)
    assert (second - want).abs().max() < 1e-12 * want.abs().max()
    assert not torch.allclose(first, second)
    xg = x.clone().requires_grad_(True)
    out = up(xg)
    assert torch.equal(out, _textbook_upsample(up, xg))
    out.sum().backward()
    assert xg.grad is not None and up.conv.weight.grad is not None
