"""The commands a user runs: `python -m deepdigits.tools.NAME`."""
