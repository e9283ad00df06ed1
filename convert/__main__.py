"""`python -m melt_jax.convert ...`: see convert/cli.py."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
