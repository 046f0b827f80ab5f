"""DiT: the Diffusion Transformer of Peebles & Xie 2023 ("Scalable Diffusion Models with Transformers").

    x (B, C, H, W) --patchify--> tokens (B, N, D) + fixed 2-D sin-cos positions, N = (H/p)(W/p)
    c = t_embed(c_noise) [+ class embedding] [+ pooled-text projection]          (B, D)
    depth x DiTBlock: adaLN-Zero (Sec. 3.2): shift/scale/gate from c for attention and MLP;
                      optional cross-attention to text tokens between them (as in PixArt-alpha)
    final layer: adaLN LayerNorm -> Linear(D, p*p*out) --unpatchify--> (B, out, H, W)

Initialization follows the paper (Sec. 3.2 and the released code's recipe): Xavier-uniform Linear
weights and zero biases, the patch embedding initialized like a Linear, N(0, 0.02) for the label
table and the timestep MLP, and zeros for every adaLN modulation and the final Linear, so each
block starts as the identity and the network outputs 0. Cross-attention output projections are
zeroed too, keeping the identity start with text conditioning.

``num_classes`` is the size of the label table: the presets use 1001 = 1000 ImageNet classes + the
"null" label that classifier-free-guidance training drops labels to, as the paper's count does.
The positional table is a non-persistent buffer (it is a function of the grid), recomputed when the
input grid differs from ``input_size / patch_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layers import (
    TIME_EMBEDDINGS,
    Attention,
    Backbone,
    NetConfig,
    check_choice,
    sincos_position_embedding,
)

__all__ = ["DiTConfig", "DiT", "sincos_pos_embed_2d"]


@dataclass(frozen=True)
class DiTConfig(NetConfig):
    """Every knob of :class:`DiT`. ``out_channels`` (the prediction's channels) defaults to
    ``in_channels``; ``learned_variance`` appends as many variance channels."""

    arch = "dit"

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int | None = None
    learned_variance: bool = False
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    freq_dim: int = 256
    time_embedding: str = "sinusoidal"
    fourier_scale: float = 16.0
    context_dim: int | None = None
    num_classes: int | None = None
    pooled_dim: int | None = None
    gradient_checkpointing: bool = False

    def __post_init__(self):
        check_choice("time_embedding", self.time_embedding, TIME_EMBEDDINGS)
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads and by 4")

    @property
    def resolved_out_channels(self) -> int:
        """Channels the network returns: the prediction's, then as many variance channels if learned."""
        base = self.out_channels if self.out_channels is not None else self.in_channels
        return 2 * base if self.learned_variance else base


def sincos_pos_embed_2d(h: int, w: int, dim: int) -> Tensor:
    """Fixed 2-D sin-cos positions (Vaswani 2017 Sec. 3.5 per axis; MAE / DiT): (h*w, dim), rows first.

    Computed on the CPU in float64 (a constant; callers move it), also under ``torch.device("meta")``.
    """
    return sincos_position_embedding((h, w), dim, device="cpu", dtype=torch.float32)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, with (B, 1, D) shift/scale broadcast over tokens."""
    return torch.addcmul(shift, x, 1 + scale)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (Peebles & Xie 2023, Sec. 3.2, Fig. 3), optional cross-attention."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(D, cfg.num_heads)
        self.cross = None
        if cfg.context_dim is not None:
            self.cross_norm = nn.LayerNorm(D, eps=1e-6)
            self.cross = Attention(D, cfg.num_heads, context_dim=cfg.context_dim)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        hidden = int(D * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(D, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, D))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None, context_mask: Tensor | None,
                rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        # x (B, N, D), c (B, D) -> six (B, 1, D) modulation vectors; rotary: tables for the self-attention
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rotary=rotary)
        if self.cross is not None:
            x = x + self.cross(self.cross_norm(x), context, context_mask)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN LayerNorm then Linear to p*p*out_channels values per token."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D, p = cfg.hidden_size, cfg.patch_size
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.linear = nn.Linear(D, p * p * cfg.resolved_out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN(c)[:, None].chunk(2, dim=-1)  # 2 x (B, 1, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p*p*out)


class DiT(Backbone):
    """Diffusion Transformer (module docstring); ``net(x, c_noise, **cond) -> (B, out, H, W)``."""

    display_name = "DiT"

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        D, p = cfg.hidden_size, cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        grid = cfg.input_size // p
        pos_embed = sincos_pos_embed_2d(grid, grid, D).to(torch.get_default_device())  # (N, D)
        self.register_buffer("pos_embed", pos_embed, persistent=False)
        self.build_embeddings(cfg.freq_dim, D)  # time_embed, class_embed, pooled_proj
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final = FinalLayer(cfg)
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The paper's init: Xavier Linear, N(0, .02) embeddings, zero adaLN and output (module docstring)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        zero = [b.adaLN[-1] for b in self.blocks] + [self.final.adaLN[-1], self.final.linear]
        zero += [b.cross.proj for b in self.blocks if b.cross is not None]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def pos_embed_for(self, h: int, w: int) -> Tensor:
        if h * w == self.pos_embed.shape[0] and h == w:
            return self.pos_embed
        return sincos_pos_embed_2d(h, w, self.config.hidden_size).to(self.pos_embed.device)

    def unpatchify(self, x: Tensor, h: int, w: int) -> Tensor:
        """(B, h*w, p*p*C) -> (B, C, h*p, w*p)."""
        p = self.config.patch_size
        x = x.reshape(x.shape[0], h, w, p, p, -1)  # (B, h, w, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], -1, h * p, w * p)

    def forward(self, x: Tensor, c_noise: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None, class_labels: Tensor | None = None,
                pooled: Tensor | None = None) -> Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[2] % cfg.patch_size or x.shape[3] % cfg.patch_size:
            raise ValueError(f"DiT expects (B, C, H, W) with H, W divisible by patch_size={cfg.patch_size}")
        if (context is None) != (cfg.context_dim is None):
            raise ValueError("`context` must be given exactly when DiTConfig.context_dim is set")
        h, w = x.shape[2] // cfg.patch_size, x.shape[3] // cfg.patch_size
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        tokens = tokens + self.pos_embed_for(h, w).to(tokens.dtype)
        c = self.embed(c_noise, class_labels, pooled)  # (B, D)
        for block in self.blocks:
            tokens = self.run_block(block, tokens, c, context, context_mask)
        return self.unpatchify(self.final(tokens, c), h, w)  # (B, out, H, W)
