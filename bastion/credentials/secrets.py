"""Secrets held in memory: a string whose ``repr`` is redacted."""

from __future__ import annotations

import hmac


class Secret:
    """A secret string that does not show itself in ``repr``, ``str`` or logs.

    ``reveal()`` is the one way to the value; grep for it to audit every use.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)
