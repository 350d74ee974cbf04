"""Table keys from channel IDs: safe characters only, never colliding."""

from __future__ import annotations

import random
import re

from shared.keys import MAX_PLAIN_KEY, encode_key

FORBIDDEN = re.compile(r"[/\\#?\x00-\x1f\x7f-\x9f]")


def random_id(rng: random.Random) -> str:
    alphabet = "ab:;@=/\\#?~%' \t\x00\x7féü会話🎉"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))


def test_keys_are_safe_and_distinct() -> None:
    # GIVEN 5,000 random IDs of awkward characters, and some made to look like escapes
    rng = random.Random(7)
    ids = {random_id(rng) for _ in range(5_000)} | {"a", "a~2F", "a/", "~~", "x" * 5_000}
    keys = {}
    # WHEN each becomes a key THEN no key holds a forbidden character or is too long, and no two
    # IDs share a key
    for value in ids:
        key = encode_key(value)
        assert not FORBIDDEN.search(key) and len(key) <= max(MAX_PLAIN_KEY, 66)
        assert key not in keys, (value, keys.get(key))
        keys[key] = value


def test_teams_ids_stay_readable() -> None:
    assert encode_key("19:abc@thread.tacv2;messageid=123") == "19:abc@thread.tacv2;messageid=123"
    assert encode_key("a:1Xyz-_.") == "a:1Xyz-_."
