"""``python -m cli``: the ``silotune`` command line without the installed script (the stack's workers)."""

from cli import app

app()
