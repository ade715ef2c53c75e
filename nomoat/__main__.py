"""`python -m nomoat` is the `nomoat` command; torchrun starts each rank this way."""

import sys

from nomoat.cli import main

sys.exit(main())
