"""``python -m detoxrl`` and ``accelerate launch -m detoxrl`` run the CLI."""

import sys

from .cli import main

sys.exit(main())
