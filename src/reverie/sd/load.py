"""Load a Stable Diffusion 1.x / 2.x checkpoint into reverie's own modules, as a :class:`DiffusionModel`.

Two layouts, told apart by what ``path`` is:

- a diffusers folder: ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``,
  each with its ``config.json`` (the scheduler's ``scheduler_config.json``) and safetensors weights;
- one ``.safetensors`` file in the original CompVis / A1111 layout (``model.diffusion_model.*``,
  ``first_stage_model.*``, ``cond_stage_model.*``). The architecture is read from the tensor names and shapes:
  SD 1 (OpenAI CLIP, 8 heads per level) or SD 2 (OpenCLIP, 64-wide heads, linear projections). Such a file
  carries neither a tokenizer nor its prediction type; see :func:`load_single_file`.

The network is :class:`reverie.nets.sd_unet.SDUNet` behind reverie's ``TextConditionedNet`` with the CLIP
encoder (``reverie.text.clip``), the autoencoder :class:`reverie.nets.sd_vae.SDAutoencoderKL`, and the schedule a
:class:`DiscreteVPSchedule` from the scheduler config's betas. Samplers see it through reverie's eps / v
denoisers, so every reverie sampler, grid and guidance option works on it, and so does everything built on
``sampling.sample_images`` (img2img, inpainting, the web API).

Refused with one line each: SDXL (a second text encoder, ``conditioner.embedders``), inpainting / depth /
instruct-pix2pix U-Nets (extra input channels), LoRA-only files, pickled ``.ckpt`` / ``.bin`` weights, and
anything that is not a Stable Diffusion checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..build import DiffusionModel
from ..conditioning import TextConditionedNet
from ..modeldir import check_state_dict, file_hash, read_json
from ..nets.autoencoder import AutoencoderConfig
from ..nets.packing import pack_weights
from ..nets.sd_unet import SDUNet, SDUNetConfig
from ..nets.sd_vae import SDAutoencoderKL
from ..schedules import DiscreteVPSchedule
from ..text.clip import CLIPTextEncoder, load_clip_tokenizer
from ..weights import check_safetensors
from . import convert

__all__ = ["FAMILY", "is_stable_diffusion", "load_stable_diffusion", "PredictionGuessWarning", "SDSettings",
           "schedule_from_config", "set_image_size"]

FAMILY = "stable-diffusion"  # model.info["family"] of every model loaded here
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}
BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}
SDXL_HINT = "SDXL is not supported yet (it needs a second text encoder, pooled and size conditioning)"


# --------------------------------------------------------------------------- the settings sampling reads

@dataclass
class SDModelSection:
    """The fields of ``TrainConfig.model`` that sampling reads (this module sits below the training layer)."""

    prediction: str = "eps"
    conditioning: str = "text"
    layout_channels: int = 0
    process: str = "gaussian"


@dataclass
class SDScheduleSection:
    name: str = "scaled_linear"
    num_timesteps: int = 1000
    zero_terminal_snr: bool = False


@dataclass
class SDSampleSection:
    """Defaults of ``reverie generate`` for an SD model: DPM-Solver++(2M) on a Karras grid, 20 steps, CFG 7.5."""

    num_images: int = 1
    sampler: str = "dpmpp_2m"
    steps: int = 20
    grid: str = "karras"
    guidance_scale: float = 7.5
    prompts: list[str] = field(default_factory=list)


@dataclass
class SDDataSection:
    name: str = "stable-diffusion"
    resolution: int = 512


@dataclass
class SDSettings:
    """What sampling reads of a model's config (``model``, ``schedule``, ``sample``, ``data``), for an SD model."""

    model: SDModelSection = field(default_factory=SDModelSection)
    schedule: SDScheduleSection = field(default_factory=SDScheduleSection)
    sample: SDSampleSection = field(default_factory=SDSampleSection)
    data: SDDataSection = field(default_factory=SDDataSection)


# --------------------------------------------------------------------------- entry points

def is_stable_diffusion(path: str | Path) -> bool:
    """Whether ``path`` looks like an SD checkpoint: a diffusers folder or a single weights file."""
    path = Path(path)
    if path.is_dir():
        return (path / "model_index.json").is_file() or (path / "unet").is_dir()
    return path.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def load_stable_diffusion(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                          prediction: str | None = None, tokenizer: str | Path | None = None,
                          channels_last: bool = False, pack: bool | None = None) -> DiffusionModel:
    """A diffusers folder or a single ``.safetensors`` file as a reverie :class:`DiffusionModel`, its ``net`` and
    ``vae`` in eval mode without gradients, on ``device`` in ``dtype`` (``torch.bfloat16`` with ``channels_last``
    is the fast path on CPUs with AMX; samplers keep float32 states either way). ``prediction`` ("eps" / "v")
    overrides the checkpoint's own (a folder's scheduler config; a single file's hints, see
    :func:`_prediction_hint`); ``tokenizer`` (a folder with CLIP's ``vocab.json`` and ``merges.txt``) matters for
    single files only. ``pack``: reorder the U-Net's and VAE's weights once for oneDNN
    (``reverie.nets.packing``; default: bf16 on the CPU).

    Its ``cfg`` is :class:`SDSettings`, the config fields this layer knows; ``Pipeline.from_pretrained`` turns it
    into a full training config (every field the sampling layer reads, at its default), so sample through a
    ``Pipeline``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    if path.is_dir():
        parts = _load_folder(path, dtype)
    else:
        parts = load_single_file(path, prediction=prediction, tokenizer=tokenizer, dtype=dtype)
    unet, vae, encoder, schedule, found, weights_hash = parts
    prediction = found if prediction is None else _check_prediction(prediction)  # the argument wins (folders too)
    cfg = SDSettings(model=SDModelSection(prediction=prediction),
                     schedule=SDScheduleSection(num_timesteps=schedule.num_timesteps,
                                                zero_terminal_snr=schedule.zero_terminal_snr),
                     data=SDDataSection(resolution=unet.config.sample_size * vae.config.downsample_factor))
    net = TextConditionedNet(unet, encoder)
    net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    if pack if pack is not None else (torch.device(device).type == "cpu" and dtype == torch.bfloat16):
        pack_weights(unet)
        pack_weights(vae)
    info = {"family": FAMILY, "in_channels": unet.config.in_channels, "resolution": unet.config.sample_size,
            "num_classes": 0,
            "image_channels": vae.config.resolved_out_channels,
            "image_resolution": unet.config.sample_size * vae.config.downsample_factor}
    model = DiffusionModel(net, cfg, info, vae=vae)
    model.schedule = schedule
    model.weights_hash = weights_hash
    return model


def set_image_size(model: DiffusionModel, width: int, height: int | None = None) -> None:
    """Generate ``width`` x ``height`` images (multiples of the autoencoder's factor, 8 for SD) from now on:
    the latent size in ``model.info`` (``latent_height``/``latent_width``; ``resolution`` is the larger side)."""
    height = width if height is None else height
    factor = model.vae.config.downsample_factor
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool) or value < factor or value % factor:
            raise ValueError(f"{name} must be a positive multiple of {factor}, got {value!r}")
    model.info.update(resolution=max(width, height) // factor, image_resolution=max(width, height),
                      latent_height=height // factor, latent_width=width // factor, image_height=height,
                      image_width=width)


def schedule_from_config(config: dict, source: str = "the scheduler config") -> DiscreteVPSchedule:
    """reverie's schedule from a diffusers scheduler config: its betas (``trained_betas`` or ``beta_schedule``
    from ``beta_start`` to ``beta_end``) over ``num_train_timesteps``, with ``rescale_betas_zero_snr``."""
    zero_snr = bool(config.get("rescale_betas_zero_snr", False))
    steps = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
        if zero_snr:
            from ..schedules import rescale_zero_terminal_snr
            betas = rescale_zero_terminal_snr(betas)
        return DiscreteVPSchedule(betas, name="custom", zero_terminal_snr=zero_snr)
    kind = config.get("beta_schedule", "linear")
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"{source}: beta_schedule {kind!r} is not supported; one of {', '.join(BETA_SCHEDULES)}")
    return DiscreteVPSchedule.from_name(BETA_SCHEDULES[kind], steps, zero_terminal_snr=zero_snr,
                                        beta_start=config.get("beta_start"), beta_end=config.get("beta_end"))


# --------------------------------------------------------------------------- diffusers folders

def _read_config(folder: Path, name: str = "config.json") -> dict:
    file = folder / name
    if not file.is_file():
        raise FileNotFoundError(f"{folder.parent} is not a Stable Diffusion folder: {folder.name}/{name} is missing")
    return read_json(file)


def _folder_weights(folder: Path) -> Path:
    """The component's safetensors file (full precision first, then an fp16 variant); pickles are refused."""
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors"):
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.bin")) or any(folder.glob("*.ckpt")):
        raise ValueError(f"{folder} holds only pickled weights (.bin), which reverie does not load (loading a "
                         f"pickle can run code); convert them to safetensors")
    raise FileNotFoundError(f"{folder} holds no safetensors weights")


def unet_config_from_diffusers(c: dict, source: str) -> SDUNetConfig:
    """:class:`SDUNetConfig` from a diffusers ``UNet2DConditionModel`` config; what SD 1/2 never use is refused."""
    if c.get("addition_embed_type") or c.get("addition_time_embed_dim"):
        raise ValueError(f"{source} is an SDXL U-Net: {SDXL_HINT}")
    if c.get("in_channels", 4) != 4:
        raise ValueError(f"{source} is an inpainting or other variant U-Net ({c['in_channels']} input channels); "
                         f"only text-to-image SD 1.x / 2.x U-Nets (4 input channels) are supported")
    unsupported = {k: c.get(k) for k, ok in (("class_embed_type", None), ("time_cond_proj_dim", None),
                                             ("encoder_hid_dim", None), ("resnet_time_scale_shift", "default"),
                                             ("time_embedding_type", "positional"), ("only_cross_attention", False),
                                             ("dual_cross_attention", False), ("center_input_sample", False),
                                             ("act_fn", "silu"), ("flip_sin_to_cos", True), ("freq_shift", 0))
                   if c.get(k, ok) != ok}
    if unsupported:
        raise ValueError(f"{source}: not a Stable Diffusion 1.x / 2.x U-Net ({unsupported})")
    chans = list(c["block_out_channels"])
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)  # diffusers' legacy name for heads
    heads = [heads] * len(chans) if isinstance(heads, int) else list(heads)
    depth = c.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        if len(set(depth)) != 1:
            raise ValueError(f"{source}: per-level transformer depths {depth} are not supported")
        depth = depth[0]
    cross = [t.startswith("CrossAttn") for t in c["down_block_types"]]
    if [t.startswith("CrossAttn") for t in reversed(c["up_block_types"])] != cross:
        raise ValueError(f"{source}: up blocks do not mirror the down blocks")
    return SDUNetConfig(in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4),
                        block_channels=tuple(chans), cross_attention=tuple(cross), num_heads=tuple(heads),
                        layers_per_block=c.get("layers_per_block", 2), transformer_depth=depth,
                        context_dim=c["cross_attention_dim"], norm_groups=c.get("norm_num_groups", 32),
                        sample_size=c.get("sample_size") or 64)


def vae_config_from_diffusers(c: dict, source: str) -> AutoencoderConfig:
    chans = list(c["block_out_channels"])
    if any(ch % chans[0] for ch in chans) or not c.get("use_quant_conv", True) \
            or not c.get("use_post_quant_conv", True) or not c.get("mid_block_add_attention", True):
        raise ValueError(f"{source}: not a Stable Diffusion 1.x / 2.x autoencoder")
    return AutoencoderConfig(in_channels=c.get("in_channels", 3), out_channels=c.get("out_channels", 3),
                             latent_channels=c.get("latent_channels", 4), base_channels=chans[0],
                             channel_mult=tuple(ch // chans[0] for ch in chans),
                             num_res_blocks=c.get("layers_per_block", 2), norm_groups=c.get("norm_num_groups", 32),
                             scaling_factor=float(c.get("scaling_factor", 0.18215)),
                             shift_factor=float(c.get("shift_factor") or 0.0))


def _check(expected: dict, found: dict, source: str) -> None:
    try:
        check_state_dict(expected, found, source)
    except ValueError as e:
        raise ValueError(str(e).replace("does not match its config.json", "does not match its architecture")) from None


def _read(path: Path, dtype: torch.dtype) -> dict:
    """A checked safetensors file's tensors, each cast to ``dtype`` as it is read (a bf16 load never holds the
    whole float32 file in memory) into memory of its own. safetensors hands out tensors at the file's offsets,
    which are not 64-byte aligned; oneDNN's results can depend on the alignment, so the same weights read from
    a diffusers folder and from a single file gave samples 4e-6 apart. Aligned, they are identical."""
    from safetensors import safe_open

    check_safetensors(path)
    try:
        with safe_open(str(path), "pt") as f:
            return {k: _owned(f.get_tensor(k), dtype) for k in f.keys()}
    except Exception as e:  # SafetensorError is a bare Exception: damage the header check did not catch
        if type(e).__name__ != "SafetensorError":
            raise
        raise ValueError(f"{path} is damaged or not a safetensors file: {e}") from None


def _owned(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as ``dtype`` in a fresh (64-byte aligned) allocation of PyTorch's."""
    return t.to(dtype, copy=True, memory_format=torch.contiguous_format)


def _build(cls, config, state: dict, source: str) -> torch.nn.Module:
    """``cls(config)`` holding ``state``: built without initializing weights (on the meta device), then given
    the checked tensors themselves."""
    with torch.device("meta"):
        module = cls(config)
    _check(module.state_dict(), state, source)
    module.load_state_dict(state, assign=True)
    return module


def _load_folder(path: Path, dtype: torch.dtype):
    index = read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    if "text_encoder_2" in index or (path / "text_encoder_2").is_dir():
        raise ValueError(f"{path} is an SDXL pipeline: {SDXL_HINT}")
    unet_dir, vae_dir = path / "unet", path / "vae"
    with _parsing(unet_dir / "config.json"):
        unet_cfg = unet_config_from_diffusers(_read_config(unet_dir), str(unet_dir / "config.json"))
    with _parsing(vae_dir / "config.json"):
        vae_cfg = vae_config_from_diffusers(_read_config(vae_dir), str(vae_dir / "config.json"))
    sched_file = path / "scheduler" / "scheduler_config.json"
    with _parsing(sched_file):
        sched_cfg = _read_config(path / "scheduler", "scheduler_config.json")
        schedule = schedule_from_config(sched_cfg, str(sched_file))
        prediction = _prediction(sched_cfg.get("prediction_type", "epsilon"), str(sched_file))
    unet_file, vae_file = _folder_weights(unet_dir), _folder_weights(vae_dir)
    unet = _build(SDUNet, unet_cfg, convert.unet_from_diffusers(_read(unet_file, dtype)), str(unet_file))
    vae = _build(SDAutoencoderKL, vae_cfg, convert.vae_from_diffusers(_read(vae_file, dtype), vae_cfg.num_res_blocks),
                 str(vae_file))
    for part in ("text_encoder", "tokenizer"):
        if not (path / part).is_dir():
            raise FileNotFoundError(f"{path} is not a Stable Diffusion folder: {part}/ is missing")
    encoder = CLIPTextEncoder.from_folders(path / "text_encoder", path / "tokenizer", dtype=dtype)
    if encoder.dim != unet_cfg.context_dim:
        raise ValueError(f"{path}: the text encoder's width {encoder.dim} is not the U-Net's context width "
                         f"{unet_cfg.context_dim}")
    return unet, vae, encoder, schedule, prediction, file_hash(unet_file)


def _prediction(name: str, source: str) -> str:
    if name not in PREDICTIONS:
        raise ValueError(f"{source}: prediction_type {name!r} is not supported; one of {', '.join(PREDICTIONS)}")
    return PREDICTIONS[name]


def _parsing(source: Path):
    from ..modeldir import parsing

    return parsing(source)


# --------------------------------------------------------------------------- single files

def _refuse_foreign(path: Path, names: list[str]) -> None:
    """One line for what a file is when it is not an SD 1.x / 2.x text-to-image checkpoint."""
    sdxl = f"{convert.UNET_PREFIX}label_emb.0.0.weight"
    if sdxl in names or any(n.startswith("conditioner.embedders.") for n in names):
        raise ValueError(f"{path} is an SDXL checkpoint: {SDXL_HINT}")
    has_unet = any(n.startswith(convert.UNET_PREFIX) for n in names)
    if not has_unet and any("lora" in n.lower() for n in names):
        raise ValueError(f"{path} is a LoRA (adapter weights only), not a full Stable Diffusion checkpoint; "
                         f"LoRA files are not supported yet")
    if not has_unet:
        unet_like = any(n.startswith(("down_blocks.", "conv_in.")) for n in names)
        hint = " (it looks like one component of a diffusers folder: load the folder instead)" if unet_like else ""
        raise ValueError(f"{path} is not a Stable Diffusion checkpoint: no {convert.UNET_PREFIX}* tensors{hint}")
    for prefix, what in ((convert.VAE_PREFIX, "autoencoder"), ("cond_stage_model.", "text encoder")):
        if not any(n.startswith(prefix) for n in names):
            raise ValueError(f"{path} lacks the {what} ({prefix}* tensors); only complete checkpoints are supported")


def _split(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class PredictionGuessWarning(UserWarning):
    """An SD 2 single file said neither eps nor v: the loader guessed v (``reverie generate`` prints it as one
    ``reverie: warning:`` line)."""


def _check_prediction(prediction: str) -> str:
    if prediction not in ("eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    return prediction


def _prediction_hint(path: Path, header: dict, is_sd2: bool, prediction: str | None) -> str:
    """eps or v, in this order: the argument, the file's metadata (``modelspec.prediction_type`` /
    ``prediction_type``), a YAML beside it (``<name>.yaml`` with ``parameterization: "v"``, A1111's convention),
    else eps for SD 1 and v for SD 2 (the 768-px SD 2.x models; the 512-px ``-base`` ones are eps and need one
    of the hints). The SD 2 guess warns (:class:`PredictionGuessWarning`): a wrong guess gives noise, not an error.

    A1111 instead runs the U-Net once at t = 999 on a constant latent and calls the file v when the output is
    far from the eps a trained network gives there; that needs trained weights (random ones, as in the tests,
    answer at random), so reverie asks instead."""
    if prediction is not None:
        return _check_prediction(prediction)
    meta = header.get("__metadata__") or {}
    for key in ("modelspec.prediction_type", "prediction_type"):
        value = str(meta.get(key, "")).lower()
        if value:
            return "v" if value.startswith("v") else "eps"
    yaml_file = path.with_suffix(".yaml")
    if yaml_file.is_file():
        text = yaml_file.read_text(encoding="utf-8", errors="replace")
        return "v" if 'parameterization: "v"' in text or "parameterization: v" in text else "eps"
    if is_sd2:
        import warnings

        warnings.warn(f"{path.name} does not say whether it predicts eps or v: guessed v (the 768-px SD 2.x models); "
                      f"a 512-px SD 2 '-base' model is eps: pass --prediction eps (prediction='eps')",
                      PredictionGuessWarning, stacklevel=2)
        return "v"
    return "eps"


def _find_tokenizer(path: Path, tokenizer: str | Path | None, is_sd2: bool):
    """The CLIP tokenizer for a single file: the argument, a ``tokenizer/`` folder beside the file, or a local
    Hugging Face cache of the model's own repository (no download)."""
    if tokenizer is not None:
        return load_clip_tokenizer(tokenizer)
    beside = path.parent / "tokenizer"
    if (beside / "vocab.json").is_file() or (beside / "tokenizer.json").is_file():
        return load_clip_tokenizer(beside)
    from ..optional import require

    transformers = require("transformers", "Stable Diffusion's CLIP tokenizer")
    repo, sub = ("stabilityai/stable-diffusion-2-1", "tokenizer") if is_sd2 else ("openai/clip-vit-large-patch14", "")
    try:
        return transformers.CLIPTokenizer.from_pretrained(repo, subfolder=sub, local_files_only=True)
    except (OSError, ValueError):
        raise FileNotFoundError(f"{path} carries no tokenizer: put CLIP's vocab.json and merges.txt in "
                                f"{beside}/ (or pass tokenizer=DIR)") from None


def _clip_model(state: dict, is_sd2: bool, tokenizer):
    """transformers' CLIPTextModel for ``state`` (``text_model.*`` names); heads are width / 64 as in every
    released SD text encoder (a file does not store them)."""
    from ..optional import require

    transformers = require("transformers", "Stable Diffusion's CLIP text encoder")
    emb = state["text_model.embeddings.token_embedding.weight"]
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers."))
    hidden = emb.shape[1]
    config = transformers.CLIPTextConfig(
        vocab_size=emb.shape[0], hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        max_position_embeddings=state["text_model.embeddings.position_embedding.weight"].shape[0],
        hidden_act="gelu" if is_sd2 else "quick_gelu", projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.device("meta"):
        model = transformers.CLIPTextModel(config)
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    if not any(k.startswith("text_model.") for k in expected):  # transformers 5 names drop the text_model level
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    _check(expected, state, "its text encoder (cond_stage_model)")
    model.load_state_dict(state, strict=False, assign=True)
    for module in model.modules():  # buffers that are not in the file (position ids), made on the meta device
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                module.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape).clone(), persistent=False)
    return model.float()


def unet_config_from_state(state: dict, is_sd2: bool) -> SDUNetConfig:
    """The U-Net's architecture from diffusers-named tensors: widths, levels, heads (SD 1: 8; SD 2: width / 64)."""
    layers, cross = convert.unet_layout_diffusers(state)
    chans = tuple(state[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(len(cross)))
    key = next(k for k in state if k.endswith("attn2.to_k.weight"))
    depth = 1 + max((int(m.group(1)) for k in state
                     if (m := re.match(r"down_blocks\.\d+\.attentions\.0\.transformer_blocks\.(\d+)\.", k))), default=0)
    heads = tuple(max(1, ch // 64) if is_sd2 else 8 for ch in chans)
    return SDUNetConfig(block_channels=chans, cross_attention=tuple(cross), num_heads=heads, layers_per_block=layers,
                        transformer_depth=depth, context_dim=state[key].shape[1],
                        in_channels=state["conv_in.weight"].shape[1], out_channels=state["conv_out.weight"].shape[0])


def vae_config_from_state(state: dict) -> AutoencoderConfig:
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down_blocks."))
    chans = [state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)]
    layers = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down_blocks.0.resnets."))
    return AutoencoderConfig(in_channels=state["encoder.conv_in.weight"].shape[1],
                             out_channels=state["decoder.conv_out.weight"].shape[0],
                             latent_channels=state["post_quant_conv.weight"].shape[0], base_channels=chans[0],
                             channel_mult=tuple(c // chans[0] for c in chans), num_res_blocks=layers,
                             norm_groups=32, scaling_factor=0.18215)


def load_single_file(path: Path, prediction: str | None = None, tokenizer: str | Path | None = None,
                     dtype: torch.dtype = torch.float32):
    """The parts of an SD 1.x / 2.x single-file checkpoint (CompVis / A1111 layout, safetensors only)."""
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: reverie loads only .safetensors checkpoints (a pickled {path.suffix} file can run "
                         f"code when loaded); convert it to safetensors first")
    header = check_safetensors(path)
    names = [n for n in header if n != "__metadata__"]
    _refuse_foreign(path, names)
    in_channels = header.get(f"{convert.UNET_PREFIX}input_blocks.0.0.weight", {}).get("shape", [0, 4])[1]
    if in_channels != 4:
        raise ValueError(f"{path} is an inpainting or other variant checkpoint ({in_channels} U-Net input "
                         f"channels); only text-to-image SD 1.x / 2.x checkpoints are supported")
    is_sd2 = any(n.startswith(convert.OPEN_CLIP_PREFIX) for n in names)
    state = _read(path, dtype)
    try:
        unet_state = convert.unet_from_compvis(_split(state, convert.UNET_PREFIX))
        vae_state = convert.vae_from_compvis(_split(state, convert.VAE_PREFIX))
        clip_state = convert.clip_from_open_clip(_split(state, convert.OPEN_CLIP_PREFIX)) if is_sd2 else \
            convert.clip_from_compvis(_split(state, convert.CLIP_PREFIX))
        unet_cfg = unet_config_from_state(unet_state, is_sd2)
        vae_cfg = vae_config_from_state(vae_state)
    except (KeyError, ValueError, IndexError, StopIteration) as e:
        what = e.args[0] if e.args else type(e).__name__
        raise ValueError(f"{path} is not a complete SD 1.x / 2.x checkpoint: {what}") from None
    del state
    prediction = _prediction_hint(path, header, is_sd2, prediction)
    pixels = 768 if is_sd2 and prediction == "v" else 512  # the size each family was trained at (the file says not)
    unet_cfg = unet_cfg.replace(sample_size=pixels // vae_cfg.downsample_factor)
    unet = _build(SDUNet, unet_cfg, convert.unet_from_diffusers(unet_state), f"{path} (its U-Net)")
    vae = _build(SDAutoencoderKL, vae_cfg, convert.vae_from_diffusers(vae_state, vae_cfg.num_res_blocks),
                 f"{path} (its autoencoder)")
    tokenizer = _find_tokenizer(path, tokenizer, is_sd2)
    try:
        clip = _clip_model(clip_state, is_sd2, tokenizer).to(dtype)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    encoder = CLIPTextEncoder(clip, tokenizer, source=str(path))
    schedule = DiscreteVPSchedule.from_name("scaled_linear", 1000)  # SD 1.x / 2.x: 0.00085 .. 0.012
    return unet, vae, encoder, schedule, prediction, file_hash(path)

