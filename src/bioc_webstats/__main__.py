"""``python -m bioc_webstats``: the same CLI as ``bioc-webstats`` (a venv without its scripts)."""

from bioc_webstats.cli import main

main()
