"""`python -m pretrain <command> ...` is `dlm <command> ...`."""

import sys

from pretrain.cli import main

sys.exit(main())
