"""``python -m candgen.cli`` (what TorchX workers and subprocess tests run)."""

import sys

from candgen.cli import main

sys.exit(main())
