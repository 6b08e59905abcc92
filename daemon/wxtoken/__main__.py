"""``python -m wxtoken`` is the ``wxtoken`` command."""

import sys

from wxtoken.cli import main

sys.exit(main())
