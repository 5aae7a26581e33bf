"""`python -m mmlm ...`: the same as the `mmlm` command."""

import sys

from .cli import main

if __name__ == "__main__":  # importing this module runs nothing
    sys.exit(main())
