"""`python -m unison` is the `unison` command (what `unison train --nproc N` starts on each rank)."""

import sys

from unison.cli import main

sys.exit(main())
