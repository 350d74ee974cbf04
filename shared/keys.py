"""Table keys: a channel's conversation or activity ID made into a safe, collision-free key.

Azure Tables forbid `/ \\ # ?` and control characters in keys and cap them at 1 KiB. We keep a
conservative set of ASCII characters as they are and write every other byte of the UTF-8 text as
`~XX` (the tilde itself included), which is reversible and therefore injective. An encoded key
longer than `MAX_PLAIN_KEY` becomes `~~` + the SHA-256 of the original: no plain key contains
`~~` (a plain `~` is always followed by two hex digits), so the two forms never meet.
"""

from __future__ import annotations

import hashlib
import string

__all__ = ["MAX_PLAIN_KEY", "encode_key"]

MAX_PLAIN_KEY = 400
_HASHED = "~~"
_KEEP = frozenset(string.ascii_letters + string.digits + "-_.:@;=,+!$()*")


def encode_key(value: str) -> str:
    """A Table-safe key for `value`, distinct for every distinct `value`."""
    if not value:
        raise ValueError("an empty ID cannot be a key")
    encoded = "".join(
        char if char in _KEEP else "".join(f"~{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
        for char in value
    )
    if len(encoded) <= MAX_PLAIN_KEY:
        return encoded
    return _HASHED + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
