"""`python -m selfsup` = the `selfsup` command."""

from selfsup.cli import main

if __name__ == "__main__":
    main()
