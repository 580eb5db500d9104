"""``python -m quantkit`` (also what ``torchrun -m quantkit quantize ...`` runs on each process)."""

import sys

from quantkit.cli import main

sys.exit(main())
