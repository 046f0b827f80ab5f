"""Bounds on numbers a user gives, shared by the library and the CLI (which reads them without importing torch,
so that ``reverie --help`` and ``--version`` start at once)."""

MAX_STEPS = 1000        # sampling steps
MAX_GUIDANCE = 50.0     # classifier-free guidance scale
