"""Stable Diffusion pipelines with random weights for tests and benchmarks, built locally with diffusers (the
test-only reference): tiny SD 1 / SD 2 configurations and the full SD 1.5 / SD 2.1 architectures.

``save_sd_pipeline(kind, path)`` writes a diffusers folder (``save_pretrained``) with a small CLIP BPE vocabulary
written here (no downloads). ``to_single_file(folder, file)`` writes the same weights in the original CompVis /
A1111 layout, the way the released ``.safetensors`` checkpoints name them (written out independently of
reverie's loader; the tests check it against diffusers' own single-file loader).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

WORDS = ["a", "red", "blue", "green", "circle", "square", "cat", "dog", "photo", "of", "the", "on", "and", "big",
         "small", "astronaut", "riding", "horse", "blurry", "ugly"]


def _byte_symbols() -> list[str]:
    """CLIP's (GPT-2's) byte-level BPE alphabet: printable bytes stand for themselves, the others for 256 + k."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_clip_tokenizer(path: Path, model_max_length: int = 77) -> Path:
    """A CLIP BPE tokenizer folder: every byte symbol (alone and word-final), merges spelling out ``WORDS``."""
    path.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in WORDS:  # merge left to right: "r e" -> "re", "re d</w>" -> "red</w>"
        current = word[0]
        for i, ch in enumerate(word[1:], start=1):
            piece = ch + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{current} {piece}")
            current = current + piece
            if current not in vocab:
                vocab.append(current)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": model_max_length,
                                                            "tokenizer_class": "CLIPTokenizer"}))
    return path


CONFIGS = {
    # name: (unet kwargs, vae kwargs, clip kwargs, prediction)
    "tiny-sd1": (dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=64, attention_head_dim=8,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8),
                 dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, sample_size=16,
                      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
                 dict(hidden_size=64, num_attention_heads=1, num_hidden_layers=2, intermediate_size=128,
                      hidden_act="quick_gelu"),
                 "epsilon"),
    "tiny-sd2": (dict(block_out_channels=(64, 128), layers_per_block=2, cross_attention_dim=64,
                      attention_head_dim=(1, 2), use_linear_projection=True,
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=8),
                 dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, sample_size=16,
                      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
                 dict(hidden_size=64, num_attention_heads=1, num_hidden_layers=3, intermediate_size=128,
                      hidden_act="gelu"),
                 "v_prediction"),
    "sd15": (dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                  attention_head_dim=8, sample_size=64,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
             dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
             dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12, intermediate_size=3072,
                  hidden_act="quick_gelu"),
             "epsilon"),
    "sd21": (dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
                  attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, upcast_attention=True,
                  sample_size=96, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
             dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=768,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
             dict(hidden_size=1024, num_attention_heads=16, num_hidden_layers=23, intermediate_size=4096,
                  hidden_act="gelu"),
             "v_prediction"),
}


def sd_scheduler_config(prediction: str) -> dict:
    """SD 1.5 / 2.1's own scheduler config (PNDM in the released folders; samplers are built from it)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type=prediction, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                clip_sample=False, skip_prk_steps=True)


def _scaled_init(module: torch.nn.Module, generator: torch.Generator, scale: float = 1.0) -> None:
    """Random weights large enough that every layer changes the output (diffusers zero-inits nothing, but its
    default init keeps deep nets near the identity): N(0, scale / fan_in) for weights, small random biases."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) * (scale / fan_in) ** 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
            else:  # norm weights
                p.copy_(1 + torch.randn(p.shape, generator=generator) * 0.05)


def build_sd_pipeline(kind: str, seed: int = 0, vocab_dir: Path | None = None):
    """A diffusers StableDiffusionPipeline with random weights for ``kind`` (a key of ``CONFIGS``)."""
    import diffusers
    import transformers

    unet_kw, vae_kw, clip_kw, prediction = CONFIGS[kind]
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**unet_kw)
    vae = diffusers.AutoencoderKL(**vae_kw)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(vocab_dir))
    vocab_size = len(tokenizer) if kind.startswith("tiny") else 49408  # the released size; the test vocab uses 576
    clip_cfg = transformers.CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=77,
                                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                           pad_token_id=tokenizer.pad_token_id, **clip_kw)
    text_encoder = transformers.CLIPTextModel(clip_cfg)
    if kind.startswith("tiny"):
        g = torch.Generator().manual_seed(seed)
        for module in (unet, vae, text_encoder):
            _scaled_init(module, g)
    scheduler = diffusers.DDIMScheduler(**{k: v for k, v in sd_scheduler_config(prediction).items()
                                           if k != "skip_prk_steps"})
    return diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def save_sd_pipeline(kind: str, path: Path, seed: int = 0) -> Path:
    """Build ``kind`` and ``save_pretrained`` it (safetensors) into ``path``."""
    vocab = write_clip_tokenizer(Path(path).parent / f"{Path(path).name}-vocab")
    pipe = build_sd_pipeline(kind, seed, vocab)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return Path(path)


# --------------------------------------------------------------------------- the CompVis / A1111 layout

def _load(folder: Path, part: str) -> dict:
    from safetensors.torch import load_file

    files = sorted((folder / part).glob("*.safetensors"))
    return load_file(str(files[0]))


def _compvis_unet(state: dict, layers: int, attention: list[bool], linear_proj: bool) -> dict:
    levels, out = len(attention), {}
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
              "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}

    def res(rest):
        head, tail = rest.split(".", 1)
        return f"{resnet[head]}.{tail}"

    for name, t in state.items():
        if m := re.match(r"time_embedding\.linear_(\d)\.(.*)", name):
            new = f"time_embed.{0 if m.group(1) == '1' else 2}.{m.group(2)}"
        elif name.startswith("conv_in."):
            new = "input_blocks.0.0." + name[8:]
        elif name.startswith("conv_norm_out."):
            new = "out.0." + name[14:]
        elif name.startswith("conv_out."):
            new = "out.2." + name[9:]
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
            i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            n = 1 + i * (layers + 1) + j
            new = f"input_blocks.{n}.0.{res(rest)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name):
            new = f"input_blocks.{1 + int(m.group(1)) * (layers + 1) + layers}.0.op.{m.group(2)}"
        elif m := re.match(r"mid_block\.(resnets|attentions)\.(\d)\.(.*)", name):
            kind, j, rest = m.groups()
            new = f"middle_block.1.{rest}" if kind == "attentions" else f"middle_block.{2 * int(j)}.{res(rest)}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
            i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            n = i * (layers + 1) + j
            new = f"output_blocks.{n}.0.{res(rest)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", name):
            i = int(m.group(1))
            sub = 2 if attention[levels - 1 - i] else 1
            new = f"output_blocks.{i * (layers + 1) + layers}.{sub}.conv.{m.group(2)}"
        else:
            raise KeyError(name)
        if re.search(r"proj_(in|out)\.weight$", new) and not linear_proj and t.ndim == 2:
            t = t[:, :, None, None]
        out["model.diffusion_model." + new] = t
    return out



def _compvis_vae(state: dict, levels: int) -> dict:
    out = {}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for name, t in state.items():
        new = name.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if m := re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", new):
            part, _, i, j, rest = m.groups()
            i = int(i) if part == "encoder" else levels - 1 - int(i)
            new = f"{part}.{'down' if part == 'encoder' else 'up'}.{i}.block.{j}.{rest}"
        elif m := re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.(.*)", new):
            part, _, i, kind, rest = m.groups()
            i = int(i) if part == "encoder" else levels - 1 - int(i)
            new = f"{part}.{'down' if part == 'encoder' else 'up'}.{i}.{kind}sample.{rest}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", new):
            new = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", new):
            new = f"{m.group(1)}.mid.attn_1.{attn[m.group(2)]}.{m.group(3)}"
            if t.ndim == 2:
                t = t[:, :, None, None]
        out["first_stage_model." + new] = t
    return out


def _open_clip(state: dict) -> dict:
    """transformers' CLIPTextModel names -> OpenCLIP's (SD 2), plus one extra (unused) last block, as the
    released SD 2 files carry 24 blocks of which SD reads 23."""
    state = {"text_model." + k.removeprefix("text_model."): v for k, v in state.items()}
    out = {"cond_stage_model.model.token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
           "cond_stage_model.model.positional_embedding": state["text_model.embeddings.position_embedding.weight"]}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers."))
    for i in range(layers + 1):
        src = i if i < layers else layers - 1  # the extra block: any weights
        p = f"text_model.encoder.layers.{src}."
        q = f"cond_stage_model.model.transformer.resblocks.{i}."
        for suffix in ("weight", "bias"):
            out[q + f"attn.in_proj_{suffix}"] = torch.cat([state[p + f"self_attn.{x}_proj.{suffix}"] for x in "qkv"])
            for ours, theirs in names.items():
                out[q + f"{theirs}.{suffix}"] = state[p + f"{ours}.{suffix}"]
    for suffix in ("weight", "bias"):
        out[f"cond_stage_model.model.ln_final.{suffix}"] = state[f"text_model.final_layer_norm.{suffix}"]
    hidden = out["cond_stage_model.model.token_embedding.weight"].shape[1]
    out["cond_stage_model.model.text_projection"] = torch.zeros(hidden, hidden)
    out["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
    return out


def to_single_file(folder: Path, file: Path, metadata: dict | None = None) -> Path:
    """The diffusers folder's weights as one CompVis / A1111-layout safetensors file."""
    from safetensors.torch import save_file

    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    attention = [t.startswith("CrossAttn") for t in unet_cfg["down_block_types"]]
    sd2 = bool(unet_cfg.get("use_linear_projection"))
    state = _compvis_unet(_load(folder, "unet"), unet_cfg["layers_per_block"], attention, sd2)
    state.update(_compvis_vae(_load(folder, "vae"), len(vae_cfg["block_out_channels"])))
    clip = _load(folder, "text_encoder")
    if sd2:
        state.update(_open_clip(clip))
    else:
        state.update({"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
                      for k, v in clip.items()})
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(file), metadata=metadata)
    return file
