"""Allow ``python -m orchestra``."""

from orchestra.cli import main

main()
