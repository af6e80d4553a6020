"""`python -m selfsup` = the `selfsup` command."""

import sys

from selfsup.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
