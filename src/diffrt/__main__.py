"""`python -m diffrt`: the `diffrt` command, for environments whose scripts folder is not on PATH."""

from diffrt.cli import entry

entry()
