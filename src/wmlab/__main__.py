"""``python -m wmlab`` is the ``wmlab`` command."""

from wmlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
