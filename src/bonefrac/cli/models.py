"""``bonefrac models``: the architecture registry."""

from __future__ import annotations


def add_arguments(p) -> None:
    pass


def run(args) -> int:
    from bonefrac.models import list_models

    for name, desc in list_models().items():
        print(f"{name:20s} {desc}")
    return 0
