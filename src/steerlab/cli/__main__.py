"""``python -m steerlab.cli``: the command line, as the ``steerlab`` script runs it."""

from steerlab.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
