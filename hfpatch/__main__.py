"""``python -m hfpatch``: the same as the ``hfpatch`` command."""
import sys

from .apps.cli import main

sys.exit(main())
