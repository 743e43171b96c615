"""``python -m mtbench`` (and ``torchrun ... -m mtbench run ...``): the command line."""

from mtbench.cli import main

main()
