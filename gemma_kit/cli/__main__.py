"""`python -m gemma_kit.cli ...`: the gemma-kit command without its installed script."""

import sys

from gemma_kit.cli import main

sys.exit(main())
