"""`python -m mlx_mistral.cli`, as the `mlx-mistral` script."""

from . import main

main()
