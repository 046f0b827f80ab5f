"""Masked (absorbing-state) diffusion on token sequences: the process, schedule, SUBS and NELBO
(``process.py``, MDLM) and its samplers (``sampling.py``: ancestral, caching, EDLM importance sampling).

    from reverie.discrete import LogLinearSchedule, sample_masked
    z = torch.full((4, 256), mask_id); z[:, :len(prompt)] = prompt      # a prompt prefix
    tokens, stats = sample_masked(denoise, z, steps=128, mask_id=mask_id, g=g, sampler="edlm",
                                  energy_model=ar_log_likelihood, k=4)

Networks, tokenizers and trained models live elsewhere (``reverie.nets.text_transformer``,
``reverie.text.chars``, ``reverie.train.text``); this package knows only token ids.
"""

from .process import LogLinearSchedule, mask_tokens, nelbo_terms, sample_times, subs_log_probs
from .sampling import (
    MASKED_SAMPLERS,
    SamplerStats,
    edlm_energy,
    importance_resample,
    sample_categorical,
    sample_masked,
)

__all__ = ["LogLinearSchedule", "mask_tokens", "nelbo_terms", "sample_times", "subs_log_probs", "MASKED_SAMPLERS",
           "SamplerStats", "edlm_energy", "importance_resample", "sample_categorical", "sample_masked"]
