"""``python -m reverie``: the ``reverie`` command."""

import sys

from .cli import main

sys.exit(main())
