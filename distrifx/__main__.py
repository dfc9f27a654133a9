"""``python -m distrifx`` is the ``distrifx`` command line."""

import sys

from distrifx.cli import main

sys.exit(main())
