"""``python -m interplay`` is the ``interplay`` command."""

from .cli.main import main

main()
