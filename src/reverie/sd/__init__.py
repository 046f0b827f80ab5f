"""Stable Diffusion 1.x / 2.x checkpoints in reverie: loading (``load``) and weight-name conversion
(``convert``). The networks are reverie's own (``reverie.nets.sd_unet``, ``reverie.nets.sd_vae``) and the text
encoder is ``reverie.text.clip``; ``reverie.pipeline.Pipeline.from_pretrained`` dispatches here."""

from .load import (
    FAMILY,
    PredictionGuessWarning,
    SDSettings,
    is_stable_diffusion,
    load_stable_diffusion,
    schedule_from_config,
    set_image_size,
)

__all__ = ["FAMILY", "PredictionGuessWarning", "SDSettings", "is_stable_diffusion", "load_stable_diffusion",
           "schedule_from_config", "set_image_size"]
