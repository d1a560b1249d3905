"""``python -m relu_regions ...``: the ``relu-regions`` command (:func:`relu_regions.cli.main`)."""

import sys

from .cli import main

sys.exit(main())
