"""`python -m atrund.cli`: the same as the `atrund` command."""

from atrund.cli import main

main()
