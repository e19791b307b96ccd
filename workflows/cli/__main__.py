"""`python -m workflows.cli VERB ...` (what Ray jobs run): the same as `bertflow VERB ...`."""

import sys

from workflows.cli import main

sys.exit(main())
