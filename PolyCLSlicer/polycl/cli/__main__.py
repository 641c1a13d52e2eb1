"""``python -m polycl.cli``: the ``polycl`` command."""

import sys

from .main import main

sys.exit(main())
