"""Evaluation: FID / KID / precision-recall (``fid``), bits/dim, prompt adherence of text-to-image models on
``shapes`` (``adherence``, with the attribute classifier of ``attributes``), the caption probe (``probe``), and
all of them at once (``evaluate``). The metric names live here, light enough for the CLI's parser."""

SAMPLE_METRICS = ("fid", "kid", "pr")
EVAL_METRICS = (*SAMPLE_METRICS, "nll", "adherence", "probe")
