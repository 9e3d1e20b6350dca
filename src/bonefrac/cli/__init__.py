"""Command-line interface: ``bonefrac <command>``; each command lives in its own module."""
