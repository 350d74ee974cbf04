"""The rolling summary: what the summary model is asked, and the work done once a reply is out.

After a turn's reply is delivered, `Summarizer.after_turn` prepares the summary the window's next
step will need: the store names the oldest turns of the window (`get_fold`), the summary model
folds them into the current summary, and the store keeps the result as pending, with a conditional
write of the head (`update_summary`). A later turn's commit makes it current as the window steps.
A failed or late summary call, or a lost race, leaves everything as it was for a later turn: this
never raises, never fails a turn, and is bounded by `DEADLINE_SECONDS`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from . import telemetry
from .budgets import TurnSpend
from .errors import ChatstateError, ModelError
from .instructions import SUMMARY_INSTRUCTIONS
from .messages import ChatMessage, Usage
from .model import ChatModel
from .settings import SUMMARY_DEADLINE_SECONDS
from .speakers import clean_name
from .store import SUMMARY_MAX_CHARS, ConversationStore, ConversationWindow
from .tokens import count_request_tokens, count_text_tokens

__all__ = ["DEADLINE_SECONDS", "SUMMARY_INSTRUCTIONS", "Summarizer", "fit_summary",
           "summary_request", "transcript_line"]

log = logging.getLogger(__name__)

#: The summary work after a reply (read, model call, write) ends within this many seconds (a
#: budget's reservation must outlast it: shared/settings.py checks).
DEADLINE_SECONDS = SUMMARY_DEADLINE_SECONDS
#: A tool result reaches the summary as its gist: at most this many characters.
TOOL_GIST_CHARS = 300


def transcript_line(message: ChatMessage) -> str:
    """One message as the summary model reads it (tool calls and results as their gist), on one
    line: the text's line breaks are spaces and the speaker's name is cleaned (`clean_name`), so
    no name or text can start a line of its own ("assistant: ...")."""
    text = " ".join((message.content or "").split())
    if message.role == "user":
        return f"{clean_name(message.name) or 'user'}: {text}"
    if message.role == "tool":
        gist = text if len(text) <= TOOL_GIST_CHARS else text[:TOOL_GIST_CHARS] + " …"
        return f"(tool {clean_name(message.name) or 'result'} returned: {gist})"
    calls = "; ".join(f"{call.name}({' '.join(call.arguments[:200].split())})"
                      for call in message.tool_calls)
    if calls:
        return f"assistant (calls {calls}){': ' + text if text else ''}"
    return f"assistant: {text}"


def summary_request(previous: str | None, messages: Sequence[ChatMessage], *,
                    token_budget: int) -> list[dict[str, Any]]:
    """The Chat Completions messages asking for the summary of `previous` + `messages`."""
    transcript = "\n".join(transcript_line(message) for message in messages)
    return [{"role": "system",
             "content": SUMMARY_INSTRUCTIONS.format(words=max(20, token_budget * 3 // 4))},
            {"role": "user",
             "content": f"Summary so far:\n{previous or '(none yet)'}\n\nNew messages:\n{transcript}"}]


def fit_summary(text: str, *, token_budget: int) -> str:
    """`text` cut (at a word) to `token_budget` tokens and the head's `SUMMARY_MAX_CHARS`."""
    text = text.strip()[:SUMMARY_MAX_CHARS]
    while text and count_text_tokens(text) > token_budget:
        text = text[:int(len(text) * 0.9)].rsplit(" ", 1)[0]
    return text


class Summarizer:
    """Prepares rolling summaries after replies, with `model`, within `token_budget` tokens.

    `history_token_budget` and `history_max_messages` are the window's limits: the store chooses
    what to fold with them.
    """

    def __init__(self, *, store: ConversationStore, model: ChatModel, token_budget: int,
                 history_token_budget: int, history_max_messages: int | None = None,
                 deadline_seconds: float = DEADLINE_SECONDS, count_spend: bool = False) -> None:
        """`count_spend`: the summary call's tokens count in the conversation's daily counter
        (`CHAT_SPEND_COUNTS_SUMMARIES`)."""
        self.store = store
        self.model = model
        self.token_budget = token_budget
        self.history_token_budget = history_token_budget
        self.history_max_messages = history_max_messages
        self.deadline_seconds = deadline_seconds
        self.count_spend = count_spend

    async def after_turn(self, window: ConversationWindow, *, spend: TurnSpend | None = None) -> bool:
        """Prepare the next step's summary if the turn's `window` says one is due. Never raises;
        True when a summary was stored. `spend`: the call is reserved and settled in the budgets
        of the user whose turn it follows (no room: no summary now, a later turn tries again)."""
        if not window.summary_due:
            return False
        started = time.perf_counter()
        try:
            with telemetry.outside_turn(), telemetry.span("chatstate.summary"):
                async with asyncio.timeout(self.deadline_seconds):
                    return await self._prepare(window.conversation_id, started, spend)
        except TimeoutError:
            log.warning("summary not prepared: over %g s; a later turn tries again",
                        self.deadline_seconds)
        except ChatstateError as exc:
            log.warning("summary not prepared (%s): %s; a later turn tries again",
                        type(exc).__name__, exc)
        except Exception:
            log.exception("summary not prepared: an unexpected failure")
        return False

    async def _prepare(self, conversation_id: str, started: float,
                       spend: TurnSpend | None) -> bool:
        job = await self.store.get_fold(conversation_id, token_budget=self.history_token_budget,
                                        max_messages=self.history_max_messages)
        if job is None:
            return False
        request = summary_request(job.summary, job.messages, token_budget=self.token_budget)
        estimate = count_request_tokens(request, model=self.model.model)
        if spend is not None:
            await spend.before_call(lambda: estimate)
        try:
            completion = await self.model.complete(request)
        except ModelError:  # billed as its request, as the prompt counts a failed call
            await self._count(conversation_id, Usage(prompt_tokens=estimate), spend)
            raise
        # billed whether or not the summary is kept
        await self._count(conversation_id, completion.usage, spend, model=completion.model)
        text = fit_summary(completion.message.content or "", token_budget=self.token_budget)
        if not text:
            log.warning("the summary model answered with no text; a later turn tries again")
            return False
        stored = await self.store.update_summary(job, text)
        log.info("summary %s: messages %d-%d folded, %d tokens, ms=%.0f",
                 "prepared" if stored else "dropped (the conversation moved on)", job.start,
                 job.to, count_text_tokens(text), (time.perf_counter() - started) * 1000)
        return stored

    async def _count(self, conversation_id: str, usage: Usage, spend: TurnSpend | None, *,
                     model: str | None = None) -> None:
        if not self.count_spend:
            return
        await self.store.charge(conversation_id, usage)
        if spend is not None:
            await spend.after_call(usage, model=model or self.model.model)
            await spend.finish()
