"""The prompt: instructions + a token-budgeted history window + the new message, through the model.

It reads like the Teams SDK's pattern, with one difference: nothing is mutated until the turn
commits, in one ETag-guarded transaction.

    memory = ConversationMemory(store, conversation_id, token_budget=8000)
    prompt = ChatPrompt(model, memory=memory, functions=[get_current_time])
    result = await prompt.send(input="hi", instructions="You are terse.")
    print(result.response.content)
    await memory.commit(result, activity_id=activity_id)   # or: ConversationConflict → re-run
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InputTooLong, MessageTooLarge, ModelTimeout, TurnTooLarge
from .messages import ChatMessage, StoredTurn, Usage
from .model import ChatModel
from .store import MAX_MESSAGE_CHARS, ConversationStore, ConversationWindow, check_turn
from .tokens import count_message_tokens
from .tools import Function

__all__ = ["ROUND_LIMIT_REPLY", "TURN_LIMIT_REPLY", "ChatPrompt", "ConversationMemory", "PromptResult"]

log = logging.getLogger(__name__)

ROUND_LIMIT_REPLY = ("Sorry, I needed more steps than I may take for one message ({rounds} rounds "
                     "of tool calls), so I stopped there. Could you narrow the question down?")
TURN_LIMIT_REPLY = ("Sorry, this answer needed more tool results than I can keep for one message, "
                    "so I stopped there. Could you ask for less at once?")
_REPLY_ROOM = "x" * 4_000  # room kept in a turn for its final reply


class ConversationMemory:
    """One conversation's durable memory, read as a token-budgeted window.

    `get_all()` is the loaded window; `set_all([])` clears the conversation; `commit()` appends a
    prompt's turn atomically, failing with `ConversationConflict` if another turn got there first.
    """

    def __init__(self, store: ConversationStore, conversation_id: str, *, token_budget: int = 8_000,
                 max_messages: int = 200, activity_id: str | None = None) -> None:
        self.store = store
        self.conversation_id = conversation_id
        self.token_budget = token_budget
        self.max_messages = max_messages
        self.activity_id = activity_id
        self.window: ConversationWindow | None = None

    async def load(self, *, reserve_tokens: int = 0) -> ConversationWindow:
        """(Re)load the window, leaving `reserve_tokens` of the budget for the new message."""
        self.window = await self.store.load_window(
            self.conversation_id, token_budget=self.token_budget - reserve_tokens,
            max_messages=self.max_messages, activity_id=self.activity_id)
        return self.window

    async def get_all(self) -> list[ChatMessage]:
        if self.window is None:
            await self.load()
        assert self.window is not None
        return list(self.window.messages)

    async def set_all(self, messages: Sequence[ChatMessage]) -> None:
        """Only `set_all([])` is supported: it clears the conversation (every row)."""
        if messages:
            raise ValueError("a durable memory is appended to by turns; set_all takes only []")
        await self.store.clear(self.conversation_id)
        self.window = None

    async def commit(self, result: PromptResult, *, activity_id: str) -> StoredTurn:
        if result.window is None:
            raise ValueError("this result was not produced from a loaded memory window")
        return await self.store.commit_turn(result.window, activity_id=activity_id,
                                            messages=result.messages)


@dataclass(frozen=True, kw_only=True)
class PromptResult:
    """A prompt's turn: `response` is the final reply; `messages` all the turn will store."""

    response: ChatMessage
    messages: tuple[ChatMessage, ...]
    usage: Usage
    model: str
    window: ConversationWindow | None
    #: The `messages` of the first model request, exactly as sent.
    request: tuple[dict[str, Any], ...]
    rounds: int


class ChatPrompt:
    def __init__(self, model: ChatModel, *, memory: ConversationMemory | None = None,
                 functions: Sequence[Function] = (), instructions: str | None = None,
                 max_tool_rounds: int = 5, tool_timeout_seconds: float = 10.0,
                 timeout_seconds: float = 60.0) -> None:
        self.model = model
        self.memory = memory
        self.instructions = instructions
        self.functions: dict[str, Function] = {}
        self.max_tool_rounds = max_tool_rounds
        self.tool_timeout_seconds = tool_timeout_seconds
        self.timeout_seconds = timeout_seconds
        for function in functions:
            self.with_function(function)

    def with_function(self, function: Function) -> ChatPrompt:
        if function.name in self.functions:
            raise ValueError(f"a tool named {function.name!r} is registered already")
        self.functions[function.name] = function
        return self

    async def send(self, input: str, *, instructions: str | None = None,
                   memory: ConversationMemory | None = None) -> PromptResult:
        """Ask the model; run the tools it calls; return the turn without storing anything."""
        memory = memory or self.memory
        user = ChatMessage(role="user", content=input)
        if len(input) > MAX_MESSAGE_CHARS:
            raise MessageTooLarge(f"a message holds at most {MAX_MESSAGE_CHARS:,} characters")
        window = None
        history: list[ChatMessage] = []
        if memory is not None:
            window = memory.window
            if window is None:  # a caller that pre-loaded the window (the webhook) checked already
                needed = count_message_tokens(user)
                if needed > memory.token_budget:
                    raise InputTooLong(f"the message needs about {needed:,} tokens; the budget "
                                       f"for a turn is {memory.token_budget:,}")
                window = await memory.load(reserve_tokens=needed)
            history = list(window.messages)
        system = instructions if instructions is not None else self.instructions
        request = ([{"role": "system", "content": system}] if system else []) + \
            [message.to_openai() for message in history] + [user.to_openai()]
        try:
            async with asyncio.timeout(self.timeout_seconds):
                turn, usage, model, rounds = await self._run(request, user)
        except TimeoutError as exc:
            raise ModelTimeout(f"the model took over {self.timeout_seconds:g} s in all") from exc
        return PromptResult(response=turn[-1], messages=tuple(turn), usage=usage, model=model,
                            window=window, request=tuple(request), rounds=rounds)

    async def _run(self, request: list[dict[str, Any]],
                   user: ChatMessage) -> tuple[list[ChatMessage], Usage, str, int]:
        conversation = list(request)
        turn: list[ChatMessage] = [user]
        usage, model = Usage(), self.model.model
        tools = [function.spec() for function in self.functions.values()] or None
        for round_number in range(self.max_tool_rounds + 1):
            completion = await self.model.complete(conversation, tools=tools)
            usage, model = usage + completion.usage, completion.model
            message = completion.message
            if not message.tool_calls:
                turn.append(_final(message))
                return turn, usage, model, round_number
            if round_number == self.max_tool_rounds:
                log.warning("the model still called tools after %d rounds; stopping", round_number)
                turn.append(self._polite(ROUND_LIMIT_REPLY.format(rounds=round_number), model))
                return turn, usage, model, round_number
            results = await asyncio.gather(*(self._invoke(call) for call in message.tool_calls))
            step = [message, *results]
            if not _fits([*turn, *step]):
                turn.append(self._polite(TURN_LIMIT_REPLY, model))
                return turn, usage, model, round_number
            turn += step
            conversation += [item.to_openai() for item in step]
        raise AssertionError("unreachable")  # pragma: no cover

    async def _invoke(self, call: Any) -> ChatMessage:
        function = self.functions.get(call.name)
        if function is None:
            content = json.dumps({"error": f"there is no tool named {call.name}"}, ensure_ascii=False)
            log.warning("the model called an unknown tool %s", call.name)
        else:
            content = (await function.invoke(call, time_limit=self.tool_timeout_seconds)).content
        return ChatMessage(role="tool", content=content, tool_call_id=call.id, name=call.name)

    def _polite(self, text: str, model: str) -> ChatMessage:
        return ChatMessage(role="assistant", content=text, model=model)


def _final(message: ChatMessage) -> ChatMessage:
    content = message.content or ""
    if len(content) > MAX_MESSAGE_CHARS:
        content = content[:MAX_MESSAGE_CHARS - 20] + " …[reply truncated]"
    return ChatMessage(role="assistant", content=content, model=message.model, usage=message.usage)


def _fits(messages: list[ChatMessage]) -> bool:
    """Whether `messages` plus a final reply can still be stored as one turn."""
    try:
        check_turn([*messages, ChatMessage(role="assistant", content=_REPLY_ROOM)])
    except (TurnTooLarge, MessageTooLarge):
        return False
    return True
