"""A long answer in parts: where a part ends (paragraph, line, sentence, word), code blocks kept
whole when that can be helped, sizes in bytes on the wire, and the activity of each part."""

from __future__ import annotations

import json

from shared.activity import ai_entity
from shared.messages import Citation
from shared.parts import cut, split_activity, split_text, wire_size

SENTENCE = "The quick brown fox jumps over the lazy dog. "


def words(text: str) -> list[str]:
    """The text's words, code fences added by a split left out (they are presentation)."""
    return [w for w in text.split() if not w.startswith("```")]


def test_a_text_that_fits_is_one_part() -> None:
    # GIVEN a short text WHEN it is cut THEN it is whole
    assert split_text("Short.", limit=100) == ["Short."]
    assert cut("Short.", limit=100).end == len("Short.")


def test_parts_end_at_paragraphs_then_sentences_then_words() -> None:
    # GIVEN paragraphs of a few sentences, one long paragraph, and one long run of words
    paragraphs = "\n\n".join(SENTENCE * 8 for _ in range(12))
    one_paragraph = SENTENCE * 100
    no_sentence = "word " * 1_000
    # WHEN each is split into parts of 2,000 bytes
    by_paragraph = split_text(paragraphs, limit=2_000)
    by_sentence = split_text(one_paragraph, limit=2_000)
    by_word = split_text(no_sentence, limit=2_000)
    # THEN every part fits, nothing is lost, and each ends where the text allows best
    for parts, text in ((by_paragraph, paragraphs), (by_sentence, one_paragraph),
                        (by_word, no_sentence)):
        assert len(parts) > 1 and all(wire_size(part) <= 2_000 for part in parts)
        assert words(" ".join(parts)) == words(text)
    assert all(part.rstrip().endswith("dog.") for part in by_paragraph)
    assert all(part.endswith("dog.") for part in by_sentence[:-1])
    assert all(part.rstrip().endswith("word") for part in by_word)
    # AND a paragraph's end is preferred to a later sentence's: parts hold whole paragraphs
    assert all(piece.strip() == (SENTENCE * 8).strip()
               for part in by_paragraph for piece in part.split("\n\n"))


def test_one_long_word_is_cut_where_it_must_be() -> None:
    # GIVEN a text with no space at all
    text = "x" * 5_000
    # WHEN it is split THEN the parts are as long as they may be
    parts = split_text(text, limit=1_002)
    assert "".join(parts) == text and [len(part) for part in parts] == [1000] * 5


def test_sizes_are_bytes_on_the_wire_not_characters() -> None:
    # GIVEN Japanese text (3 bytes a character in UTF-8) and text with quotes and newlines
    japanese = "今日は良い天気です。" * 600
    escaped = 'He said "no".\n' * 800
    # WHEN each is split into parts of 4,000 bytes
    for text in (japanese, escaped):
        parts = split_text(text, limit=4_000)
        # THEN each part's JSON is within the limit, though its characters are fewer
        assert all(len(json.dumps(part, ensure_ascii=False).encode()) <= 4_000 for part in parts)
        assert "".join(parts).replace("\n", "") == text.replace("\n", "")
    assert all(part.endswith("。") for part in split_text(japanese, limit=4_000))


def test_a_code_block_is_not_cut_when_a_place_before_it_will_do() -> None:
    # GIVEN prose, then a code block that would not fit in what is left of the part
    prose = "\n\n".join(SENTENCE * 4 for _ in range(6))
    code = "```python\n" + "".join(f"value_{i} = {i}\n" for i in range(60)) + "```"
    text = f"{prose}\n\n{code}\n\nThat is all."
    # WHEN it is split into parts of 1,800 bytes
    parts = split_text(text, limit=1_800)
    # THEN the code block starts a part and is whole in it
    holding = [part for part in parts if "```python" in part]
    assert len(holding) == 1 and holding[0].startswith("```python") and holding[0].count("```") == 2
    assert words(" ".join(parts)) == words(text)


def test_a_code_block_larger_than_a_part_is_cut_at_a_line_closed_and_opened_again() -> None:
    # GIVEN a code block larger than one part
    text = "Here:\n\n```python\n" + "".join(f"value_{i} = {i}\n" for i in range(300)) + "```\n\nDone."
    # WHEN it is split
    parts = split_text(text, limit=2_000)
    # THEN each part's fences pair up, a continued block opens with its language again, and every
    # line of code is whole in one part
    assert len(parts) > 2
    for part in parts:
        assert part.count("```") % 2 == 0 and wire_size(part) <= 2_000
    assert all(part.startswith("```python\nvalue_") for part in parts[1:-1])
    lines = [line for part in parts for line in part.splitlines() if line.startswith("value_")]
    assert lines == [f"value_{i} = {i}" for i in range(300)]


def test_a_cut_for_time_looks_near_the_end_only() -> None:
    # GIVEN a text with a paragraph end early and a sentence end near its end
    text = "First paragraph.\n\n" + SENTENCE * 20 + "and then some words"
    # WHEN the whole of it must go now (limit = its size), looking only in its last quarter
    place = cut(text, limit=wire_size(text) - 1, floor=0.75)
    # THEN it ends at the last sentence, not the early paragraph
    assert text[:place.end].endswith("dog.") and place.end > len(text) * 0.75
    assert text[place.start:] == "and then some words"
    # AND a short text with no sentence end is cut at a word, anywhere, rather than mid-word
    assert cut("just two", limit=wire_size("just two") - 1, floor=0.0).end == len("just")
    assert not cut("oneword", limit=wire_size("oneword") - 1).clean


def test_each_part_is_an_activity_with_the_label_and_the_buttons_on_the_last() -> None:
    # GIVEN a reply of 60 KB citing sources 1 and 2, with buttons and feedback
    text = "\n\n".join(f"Paragraph {i}: " + SENTENCE * 10 for i in range(130))
    text = text.replace("Paragraph 3:", "Paragraph 3 [1]:").replace("Paragraph 120:", "Paragraph 120 [2]:")
    citations = [Citation(position=n, title=f"Source {n}", url=f"https://example.com/{n}", snippet="s")
                 for n in (1, 2)]
    activity = {"type": "message", "text": text, "entities": [ai_entity(citations)],
                "channelData": {"feedbackLoop": {"type": "default"}},
                "suggestedActions": {"actions": [{"type": "imBack", "title": "Why?", "value": "Why?"}]}}
    # WHEN it is split into activities
    parts = split_activity(activity)
    # THEN each is within Teams' size with room for a stream's final, in order, text whole
    assert len(parts) == 3 and all(wire_size(json.dumps(part)) < 26_000 for part in parts)
    assert words(" ".join(part["text"] for part in parts)) == words(text)
    # AND every part is labelled AI-generated, and cites only the sources its text cites
    claims = [[c["position"] for c in part["entities"][0].get("citation", [])] for part in parts]
    assert claims == [[1], [], [2]]
    assert all(part["entities"][0]["additionalType"] == ["AIGeneratedContent"] for part in parts)
    # AND the buttons and the feedback are on the last part only
    assert ["suggestedActions" in part for part in parts] == [False, False, True]
    assert ["channelData" in part for part in parts] == [False, False, True]
    # AND when the earlier parts went out before the sources were known, the last cites them all
    last = split_activity(activity, claims="last")
    assert [len(p["entities"][0].get("citation", [])) for p in last] == [0, 0, 2]
