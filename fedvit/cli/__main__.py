"""``python -m fedvit.cli``: the ``fedvit`` command."""

import sys

from fedvit.cli import main

sys.exit(main())
