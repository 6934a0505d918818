"""``python -m specdec`` -- same as the ``specdec`` console script."""

from specdec.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
