"""``python -m synthtools models``: same as the ``synthtools`` command."""
from .cli.models import main

main()
