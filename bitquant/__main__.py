"""``python -m bitquant`` (and ``torchrun -m bitquant``): the ``bitquant`` command."""

from bitquant.cli.main import main

if __name__ == "__main__":
    main()
