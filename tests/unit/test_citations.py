"""Sources and citations (no I/O): what a tool's sources become, which ones a reply cites, and the
Teams entity that carries them."""

from __future__ import annotations

from shared.activity import AI_GENERATED, MAX_CITATIONS, ai_entity
from shared.messages import ChatMessage, Citation
from shared.prompt import cited
from shared.store._codec import entity_message, message_entity
from shared.tools import MAX_SOURCE_SNIPPET_CHARS, MAX_SOURCE_TITLE_CHARS, Source


def test_a_source_is_one_bounded_line_and_keeps_only_a_web_url() -> None:
    # GIVEN sources as a server might send them: long, multi-line, with odd URLs
    long = Source(title="A\nforged\u202e title " + "x" * 200, url=" https://a.example/doc ",
                  snippet="line one\nline two " + "y" * 400)
    script = Source(title="", url="javascript:alert(1)")
    # THEN titles and snippets are single lines within Teams' lengths, and only http(s) URLs stay
    assert "\n" not in long.title and "\u202e" not in long.title
    assert len(long.title) <= MAX_SOURCE_TITLE_CHARS and long.title.endswith("…")
    assert long.snippet.startswith("line one line two") and \
        len(long.snippet) <= MAX_SOURCE_SNIPPET_CHARS
    assert long.url == "https://a.example/doc"
    assert script.url is None and script.title == "javascript:alert(1)"


def test_a_reply_keeps_the_sources_it_cites_in_order_of_their_numbers() -> None:
    # GIVEN three sources of a turn
    sources = [Source(title=f"doc {n}", url=f"https://a.example/{n}") for n in (1, 2, 3)]
    # WHEN a reply cites [3] and [1] (twice), and a number no source has
    found = cited("See [3], and [1]; also [1] and [7].", sources)
    # THEN it keeps sources 1 and 3, numbered as cited
    assert [(c.position, c.title) for c in found] == [(1, "doc 1"), (3, "doc 3")]
    assert cited("no citation here", sources) == () and cited("[1]", []) == ()


def test_the_ai_entity_carries_teams_citation_claims() -> None:
    # GIVEN two citations, one without a URL or snippet
    citations = [Citation(position=1, title="Doc", url="https://a.example/1", snippet="About it."),
                 Citation(position=2, title="Note")]
    # WHEN the AI label entity is built
    entity = ai_entity(citations)
    # THEN it is the AI label with one schema.org Claim per citation
    assert {k: v for k, v in entity.items() if k != "citation"} == AI_GENERATED
    assert entity["citation"] == [
        {"@type": "Claim", "position": 1, "appearance": {
            "@type": "DigitalDocument", "name": "Doc", "abstract": "About it.",
            "url": "https://a.example/1"}},
        {"@type": "Claim", "position": 2, "appearance": {
            "@type": "DigitalDocument", "name": "Note", "abstract": "Note"}}]
    # AND with no citation it is the plain AI label; more than the cap are cut
    assert ai_entity() == AI_GENERATED
    many = [Citation(position=n, title=f"d{n}") for n in range(1, 30)]
    assert len(ai_entity(many)["citation"]) == MAX_CITATIONS


def test_citations_are_stored_with_the_reply() -> None:
    # GIVEN a reply with a citation WHEN it goes through a table row and back
    reply = ChatMessage(role="assistant", content="Yes [1].",
                        citations=(Citation(position=1, title="Doc", url="https://a.example",
                                            snippet="s"),))
    row = message_entity("pk", 3, reply, tokens=5, turn_seq=2, activity_id="a1")
    # THEN the citation comes back as it was; a message without one stores nothing for it
    assert entity_message(row).citations == reply.citations
    plain = message_entity("pk", 4, ChatMessage(role="assistant", content="No."), tokens=1,
                           turn_seq=3, activity_id="a2")
    assert "citations" not in plain and entity_message(plain).citations == ()
