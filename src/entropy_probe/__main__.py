"""``python -m entropy_probe``: the same as the ``entropy-probe`` command."""

import sys

from .cli import main

sys.exit(main())
