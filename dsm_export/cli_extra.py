"""Subcommands beyond export/validate/inspect (engines, serving, schedule tuning)."""

COMMANDS: list = []
