"""Allow ``python -m orchestra``."""

from orchestra.cli import main

if __name__ == "__main__":  # not when a render process (spawned) imports this module
    main()
