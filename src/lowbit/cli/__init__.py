"""Command-line interface: ``lowbit <command>``; each command wraps one public function."""

from lowbit.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
