"""`python -m rys_forge.cli`."""

from rys_forge.cli import main

main()
