"""`python -m qcompiler.cli`: the command line."""

from qcompiler.cli import main

if __name__ == "__main__":
    main()
