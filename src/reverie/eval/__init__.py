"""Evaluation: prompt adherence of text-to-image models on ``shapes`` (attribute classifier + seeded prompts)."""
