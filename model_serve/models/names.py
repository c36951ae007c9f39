"""How served names compare: the two spellings of one name. Kept apart from the catalog so the
engines and the CLI can compare names without loading the catalog's machinery."""

from __future__ import annotations


def dash_form(name: str) -> str:
    """The colon-free twin of a served name: the router's id for it (a ':' in a section name
    is rewritten), and a name older clients use. Both forms are accepted everywhere; the
    colon form is the one shown."""
    return name.replace(":", "-")


def identity(name: str) -> str:
    """What makes two names the same to an engine: case, and ':' against '-', do not count."""
    return dash_form(name).lower()
