"""`python -m training CONFIG` (what torchrun runs): the same as `openmind-train CONFIG`."""

import sys

from training.cli import main

sys.exit(main())
