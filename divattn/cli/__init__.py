"""Subcommands of ``python -m divattn``."""
