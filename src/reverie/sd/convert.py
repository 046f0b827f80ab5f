"""Weight names: diffusers' Stable Diffusion layout -> reverie's modules, and the original CompVis / A1111
single-file layout -> diffusers' names (so both go through one map into reverie).

Every function takes and returns plain ``{name: tensor}`` dicts and renames or reshapes only; a tensor's values
are never changed (fused projections are concatenations). reverie's modules check the result's names and
shapes when it is loaded, so a map that missed a tensor fails there, naming it.
"""

from __future__ import annotations

import re

import torch

# --------------------------------------------------------------------------- diffusers -> reverie


def _attention_fuse(state: dict, prefix: str, pairs: dict[str, tuple[str, ...]]) -> None:
    """Replace ``prefix + part`` tensors by their concatenation under ``prefix + fused`` (weights and biases)."""
    for fused, parts in pairs.items():
        for suffix in ("weight", "bias"):
            names = [f"{prefix}{p}.{suffix}" for p in parts]
            if all(n in state for n in names):
                state[f"{prefix}{fused}.{suffix}"] = torch.cat([state.pop(n) for n in names])


def _linear(t: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv weight (out, in, 1, 1) as a Linear weight (out, in); a Linear weight as it is."""
    return t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t


_UNET_RENAMES = [
    (r"^time_embedding\.linear_1\.", "time_embed.mlp.0."),
    (r"^time_embedding\.linear_2\.", "time_embed.mlp.2."),
    (r"^down_blocks\.", "down."),
    (r"^up_blocks\.", "up."),
    (r"^mid_block\.", "mid."),
    (r"\.downsamplers\.0\.conv\.", ".resample.op."),
    (r"\.upsamplers\.0\.conv\.", ".resample.conv."),
    (r"\.conv_shortcut\.", ".skip."),
    (r"\.transformer_blocks\.", ".blocks."),
    (r"\.to_out\.0\.", ".proj."),
    (r"\.ff\.net\.0\.proj\.", ".ff.proj."),
    (r"\.ff\.net\.2\.", ".ff.out."),
    (r"^conv_norm_out\.", "norm_out."),
]


def unet_from_diffusers(state: dict) -> dict:
    """A diffusers ``UNet2DConditionModel`` state dict (SD 1.x / 2.x) in :class:`reverie.nets.sd_unet.SDUNet` names."""
    out = {}
    for name, t in state.items():
        for pattern, repl in _UNET_RENAMES:
            name = re.sub(pattern, repl, name)
        if re.search(r"\.proj_(in|out)\.weight$", name):
            t = _linear(t)
        out[name] = t
    for prefix in {n.rsplit(".attn1.", 1)[0] for n in out if ".attn1." in n}:
        _attention_fuse(out, prefix + ".attn1.", {"qkv": ("to_q", "to_k", "to_v")})
        _attention_fuse(out, prefix + ".attn2.", {"q": ("to_q",), "kv": ("to_k", "to_v")})
    return out


_VAE_ATTENTION_RENAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # old diffusers


def vae_from_diffusers(state: dict, layers_per_block: int) -> dict:
    """A diffusers ``AutoencoderKL`` state dict in :class:`reverie.nets.sd_vae.SDAutoencoderKL` names."""
    out = {}
    for name, t in state.items():
        parts = name.split(".")
        if parts[0] in ("encoder", "decoder") and parts[1] in ("down_blocks", "up_blocks"):
            level, kind, j = int(parts[2]), parts[3], parts[4]
            per_level = layers_per_block + (1 if parts[0] == "encoder" else 2)  # res blocks + the resampler
            index = level * per_level + (int(j) if kind == "resnets" else per_level - 1)
            sub = "op" if parts[0] == "encoder" else "conv"
            rest = parts[5:] if kind == "resnets" else [sub] + parts[6:]
            name = ".".join([parts[0], "down" if parts[0] == "encoder" else "up", str(index), *rest])
        elif parts[0] in ("encoder", "decoder") and parts[1] == "mid_block":
            index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{parts[2]}.{parts[3]}"]
            rest = [_VAE_ATTENTION_RENAMES.get(p, p) for p in parts[4:]]
            name = ".".join([parts[0], "mid", str(index), *rest])
        name = name.replace(".conv_norm_out.", ".norm_out.").replace(".conv_shortcut.", ".skip.")
        name = name.replace(".group_norm.", ".norm.").replace(".to_out.0.", ".attn.proj.")
        if re.search(r"\.mid\.1\.(to_[qkv]|attn\.proj)\.weight$", name):
            t = _linear(t)
        out[name] = t
    for part in ("encoder", "decoder"):
        _attention_fuse(out, f"{part}.mid.1.", {"attn.qkv": ("to_q", "to_k", "to_v")})
    return out


# --------------------------------------------------------------------------- CompVis / A1111 -> diffusers

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."          # SD 1.x: OpenAI CLIP, already in transformers' names
OPEN_CLIP_PREFIX = "cond_stage_model.model."            # SD 2.x: OpenCLIP

_COMPVIS_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                   "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _resnet(rest: str) -> str:
    for old, new in _COMPVIS_RESNET.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_layout(state: dict) -> tuple[int, list[bool]]:
    """(layers_per_block, cross-attention per level) of a CompVis U-Net, read from its names."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"input_blocks\.(\d+)\.", k))}
    downs = sorted(int(m.group(1)) for k in state if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    if not downs:
        raise ValueError("its U-Net has no downsampling layers (input_blocks.N.0.op)")
    per_level = downs[0]  # input_blocks 1 .. L are level 0's res blocks, L + 1 its downsampler
    levels = len(downs) + 1
    if max(blocks) != levels * per_level - 1:
        raise ValueError(f"its U-Net has {max(blocks) + 1} input blocks, not {levels * per_level} for {levels} levels")
    attention = [f"input_blocks.{1 + level * per_level}.1.proj_in.weight" in state for level in range(levels)]
    return per_level - 1, attention


def unet_layout_diffusers(state: dict) -> tuple[int, list[bool]]:
    """(layers_per_block, cross-attention per level) of a U-Net in diffusers' names."""
    levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"down_blocks\.(\d+)\.", k)))
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)))
    return layers, [any(k.startswith(f"down_blocks.{i}.attentions.") for k in state) for i in range(levels)]


def unet_from_compvis(state: dict) -> dict:
    """A CompVis ``model.diffusion_model`` state dict (prefix removed) in diffusers' names."""
    layers, attention = unet_layout(state)
    per_level = layers + 1
    levels = len(attention)
    out = {}
    for name, t in state.items():
        if name.startswith("time_embed.0."):
            new = "time_embedding.linear_1." + name[len("time_embed.0."):]
        elif name.startswith("time_embed.2."):
            new = "time_embedding.linear_2." + name[len("time_embed.2."):]
        elif name.startswith("input_blocks.0.0."):
            new = "conv_in." + name[len("input_blocks.0.0."):]
        elif name.startswith("out.0."):
            new = "conv_norm_out." + name[len("out.0."):]
        elif name.startswith("out.2."):
            new = "conv_out." + name[len("out.2."):]
        elif m := re.match(r"input_blocks\.(\d+)\.(\d)\.(.*)$", name):
            n, sub, rest = int(m.group(1)) - 1, int(m.group(2)), m.group(3)
            level, j = divmod(n, per_level)
            if j == layers:
                new = f"down_blocks.{level}.downsamplers.0.conv." + rest[len("op."):]
            elif sub == 0:
                new = f"down_blocks.{level}.resnets.{j}.{_resnet(rest)}"
            else:
                new = f"down_blocks.{level}.attentions.{j}.{rest}"
        elif m := re.match(r"middle_block\.(\d)\.(.*)$", name):
            sub, rest = int(m.group(1)), m.group(2)
            new = {0: f"mid_block.resnets.0.{_resnet(rest)}", 1: f"mid_block.attentions.0.{rest}",
                   2: f"mid_block.resnets.1.{_resnet(rest)}"}[sub]
        elif m := re.match(r"output_blocks\.(\d+)\.(\d)\.(.*)$", name):
            n, sub, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            level, j = divmod(n, per_level)
            has_attention = attention[levels - 1 - level]
            if sub == 0:
                new = f"up_blocks.{level}.resnets.{j}.{_resnet(rest)}"
            elif sub == 1 and has_attention:
                new = f"up_blocks.{level}.attentions.{j}.{rest}"
            else:
                new = f"up_blocks.{level}.upsamplers.0.conv." + rest[len("conv."):]
        else:
            raise ValueError(f"its U-Net holds an unknown tensor {UNET_PREFIX}{name}")
        out[new] = t
    return out


_COMPVIS_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
_COMPVIS_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_levels(state: dict) -> int:
    """Number of levels of a CompVis VAE (``encoder.down.N``)."""
    return 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k)))


def vae_from_compvis(state: dict) -> dict:
    """A CompVis ``first_stage_model`` state dict (prefix removed) in diffusers' names."""
    levels = vae_levels(state)
    out = {}
    for name, t in state.items():
        parts = name.split(".")
        if parts[0] in ("encoder", "decoder") and parts[1] in ("down", "up"):
            level = int(parts[2]) if parts[0] == "encoder" else levels - 1 - int(parts[2])
            block = "down_blocks" if parts[0] == "encoder" else "up_blocks"
            if parts[3] == "block":
                rest = [_COMPVIS_VAE_RESNET.get(parts[5], parts[5]), *parts[6:]]
                name = ".".join([parts[0], block, str(level), "resnets", parts[4], *rest])
            else:  # downsample.conv / upsample.conv
                sampler = "downsamplers" if parts[0] == "encoder" else "upsamplers"
                name = ".".join([parts[0], block, str(level), sampler, "0", *parts[4:]])
        elif parts[0] in ("encoder", "decoder") and parts[1] == "mid":
            if parts[2] == "attn_1":
                name = ".".join([parts[0], "mid_block.attentions.0", _COMPVIS_VAE_ATTENTION[parts[3]], *parts[4:]])
            else:
                index = {"block_1": 0, "block_2": 1}[parts[2]]
                rest = [_COMPVIS_VAE_RESNET.get(parts[3], parts[3]), *parts[4:]]
                name = ".".join([parts[0], "mid_block.resnets", str(index), *rest])
        elif parts[0] in ("encoder", "decoder") and parts[1] in ("norm_out",):
            name = ".".join([parts[0], "conv_norm_out", *parts[2:]])
        out[name] = t
    return out


def clip_from_compvis(state: dict) -> dict:
    """SD 1.x's ``cond_stage_model.transformer`` tensors (prefix removed) in transformers' CLIPTextModel names."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()
            if not k.endswith("position_ids")}


_OPEN_CLIP = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
              "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def open_clip_layers(state: dict) -> int:
    return 1 + max(int(m.group(1)) for k in state if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k)))


def clip_from_open_clip(state: dict) -> dict:
    """SD 2.x's OpenCLIP text tower (``cond_stage_model.model``, prefix removed) as a transformers CLIPTextModel
    up to its penultimate layer, the one SD 2 reads: the last residual block is dropped and ``ln_final`` becomes
    the final LayerNorm (as SD 2's ``FrozenOpenCLIPEmbedder(layer="penultimate")`` computes)."""
    keep = open_clip_layers(state) - 1
    out = {"text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": state["positional_embedding"]}
    for suffix in ("weight", "bias"):
        out[f"text_model.final_layer_norm.{suffix}"] = state[f"ln_final.{suffix}"]
    for name, t in state.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)[._](weight|bias)$", name)  # attn.in_proj_weight
        if not m or int(m.group(1)) >= keep:
            continue
        layer, part, suffix = m.groups()
        prefix = f"text_model.encoder.layers.{layer}."
        if part == "attn.in_proj":
            for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3)):
                out[f"{prefix}self_attn.{proj}.{suffix}"] = chunk
        else:
            out[f"{prefix}{_OPEN_CLIP[part]}.{suffix}"] = t
    return out
