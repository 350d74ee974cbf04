"""The offline stand-in with the Teams app's parts: it says what images it received, and writes
suggested replies when the instructions ask for them."""

from __future__ import annotations

from shared.offline import offline_reply
from shared.suggestions import INSTRUCTION, split


def test_the_stand_in_says_how_many_images_came_as_image_input() -> None:
    # GIVEN a user message with text and two images, as the prompt sends it
    content = [{"type": "text", "text": "what are these?\n\n[image: a.png, 1 KB]"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
               {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,BBBB"}}]
    # WHEN the stand-in answers
    reply = offline_reply([{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": content}])
    # THEN it quotes the text and names what it received
    assert "You said “what are these? [image: a.png, 1 KB]”." in reply
    assert "2 images as image input (image/png, image/jpeg)" in reply
    assert split(reply) == (reply, ())


def test_the_stand_in_suggests_replies_when_asked() -> None:
    # GIVEN instructions that ask for suggested replies
    messages = [{"role": "system", "content": "Be brief." + INSTRUCTION},
                {"role": "user", "content": "hi"}]
    # WHEN the stand-in answers
    answer, suggestions = split(offline_reply(messages))
    # THEN its answer ends with a block that reads as two suggestions
    assert answer.startswith("[offline stand-in") and "<" not in answer
    assert suggestions == ("What did I say before?", "Sum up our chat")
