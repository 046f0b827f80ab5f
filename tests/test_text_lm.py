"""Text models: the transformer uses positions (the ANCHORS pitfall), causality, the trainer, model directories
and generate-text."""

import math

import pytest
import torch

from reverie.discrete import LogLinearSchedule, mask_tokens
from reverie.nets.text_transformer import TextTransformer, TextTransformerConfig
from reverie.train.text import text_loss

PERIOD, SEQ = 8, 32


def periodic_batch(n, g):
    """Rows 'abcdefgh' repeated from a random phase: every token is fixed by its neighbours and position, yet
    every token is equally frequent, so a model that ignores positions (a bag of tokens) cannot beat
    log2(8) = 3 bits on a masked token."""
    phase = torch.randint(0, PERIOD, (n, 1), generator=g)
    return (phase + torch.arange(SEQ)) % PERIOD


def train_tiny(objective, steps=150, **overrides):
    torch.manual_seed(0)
    cfg = TextTransformerConfig(vocab_size=PERIOD, max_len=SEQ, hidden_size=32, depth=2, num_heads=2,
                                causal=objective == "ar", **overrides)
    net = TextTransformer(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    g, schedule = torch.Generator().manual_seed(0), LogLinearSchedule(1e-3)
    for _ in range(steps):
        loss = text_loss(net, periodic_batch(32, g), objective, g, schedule).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def masked_bits(net, rate, g):
    x = periodic_batch(256, g)
    z, masked = mask_tokens(x, torch.full((256,), 1 - rate, dtype=torch.float64), PERIOD, g)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(net(z).transpose(1, 2), x, reduction="none")
    return float(ce[masked].mean()) / math.log(2)


def test_bidirectional_model_uses_positions_at_low_mask_rates():
    """At 10% masking every masked token is predictable from its neighbours: a trained bidirectional model
    must be far below the 3 bits of a bag of tokens (ANCHORS: a position table 50x smaller than the token
    table left one at 4.43 bits vs a unigram entropy of 4.78)."""
    net = train_tiny("mdlm")
    assert masked_bits(net, 0.1, torch.Generator().manual_seed(1)) < 1.0


def test_causal_model_does_not_look_ahead():
    net = TextTransformer(TextTransformerConfig(vocab_size=8, max_len=16, hidden_size=32, depth=2, num_heads=2,
                                                causal=True))
    torch.nn.init.normal_(net.head.weight)
    x = torch.randint(0, 8, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 8
    a, b = net(x), net(y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6) and not torch.allclose(a[:, 10:], b[:, 10:])


def test_time_conditioned_network_uses_dit_blocks():
    from reverie.nets.dit import DiTBlock

    net = TextTransformer(TextTransformerConfig(vocab_size=8, max_len=16, hidden_size=32, depth=2, num_heads=2,
                                                time_conditioning=True))
    assert all(isinstance(b, DiTBlock) for b in net.blocks)
    assert net(torch.randint(0, 10, (3, 16)), torch.rand(3)).shape == (3, 16, 8)
    with pytest.raises(ValueError, match="time-conditioned"):
        net(torch.randint(0, 10, (3, 16)))
    with pytest.raises(ValueError, match="no time conditioning"):
        TextTransformerConfig(causal=True, time_conditioning=True)
