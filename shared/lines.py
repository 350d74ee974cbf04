"""Text from outside on one line: no control, format (bidi overrides, zero-width) or separator
characters, so a name or a button's text can neither start a line of its own nor reverse what
follows it on screen."""

from __future__ import annotations

import unicodedata

__all__ = ["one_line"]

#: Control, format (U+202E and the other bidi controls, zero-width), line and paragraph
#: separators, surrogates, private use and unassigned code points.
_UNSEEN = frozenset(("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"))


def one_line(text: str) -> str:
    """`text` with every unseen character a space, runs of spaces one, trimmed."""
    return " ".join("".join(" " if unicodedata.category(c) in _UNSEEN else c
                            for c in text).split())
