"""``python -m hfpatch``: the same as the ``hfpatch`` command."""
import sys

from .cli import main

sys.exit(main())
