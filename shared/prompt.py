"""The prompt: instructions + a history window + the new message, through the model and its tools.

`ChatPrompt` is built once (model, tools, instructions, limits) and holds no per-turn state: each
`send` takes the history and returns the turn's messages, storing nothing. `ConversationMemory`
is the durable memory of one conversation, read as a token-budgeted window and appended to by
turns in one ETag-guarded transaction. Together they read like the Teams SDK's pattern:

    memory = ConversationMemory(store, conversation_id, token_budget=8000)
    prompt = ChatPrompt(model, functions=[get_current_time], instructions="You are terse.")
    result = await prompt.send("hi", memory=memory)
    print(result.response.content)
    await memory.commit(result, activity_id=activity_id)   # or: ConversationConflict → re-run

With a rolling summary (`shared/summary.py`), the request is: instructions, the summary of what
left the window (a user-role message that quotes it as conversation data: it was written from
what people said, so it never speaks with the instructions' voice), the window, the new message.

Tools come from `functions` and from tool sources (`shared/mcp.py`), asked each turn (cached
there). Sources a tool returns are numbered for the turn and listed after its result; the model
is asked to cite them as [n], and the reply keeps the ones it cites as `citations`.

Every model call goes through `_call`: a `SpendHook` (`shared/budgets.py`) reserves its worst case
before it and settles what it cost after; what each call billed is tallied whatever ends the turn,
so a `ModelError` carries the usage of the rounds before it (`billed`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from . import suggestions, telemetry
from .attachments import Incoming
from .errors import (
    BudgetExhausted,
    InputTooLong,
    MessageTooLarge,
    ModelError,
    ModelTimeout,
    TurnTooLarge,
)
from .instructions import SUMMARY_HEADING
from .listeners import TextListener, ToolListener
from .messages import ChatMessage, Citation, Sender, StoredTurn, ToolCall, Usage
from .model import ChatModel, Completion
from .speakers import SpeakerStyle, wire_message
from .store import MAX_MESSAGE_CHARS, ConversationStore, ConversationWindow, check_turn
from .tokens import count_message_tokens, count_request_tokens, count_text_tokens
from .tools import Function, Source, ToolResult, failed

__all__ = ["BUDGET_STOP_REPLY", "ROUND_LIMIT_REPLY", "TURN_LIMIT_REPLY", "ChatPrompt",
           "ConversationMemory", "PromptResult", "ReplyStopped", "SpendHook", "ToolListener",
           "ToolSource", "UserInput", "check_input"]

log = logging.getLogger(__name__)

ROUND_LIMIT_REPLY = ("Sorry, I needed more steps than I may take for one message ({rounds} rounds "
                     "of tool calls), so I stopped there. Could you narrow the question down?")
TURN_LIMIT_REPLY = ("Sorry, this answer needed more tool results than I can keep for one message, "
                    "so I stopped there. Could you ask for less at once?")
BUDGET_STOP_REPLY = "I had to stop there, before I could finish. {reason}"
_REPLY_ROOM = "x" * 4_000  # room kept in a turn for its final reply


class ReplyStopped(Exception):
    """Raised by a text listener to end the reply now, with `text` as its content; `stopped`:
    the user stopped it (the stored reply is marked so)."""

    def __init__(self, text: str, *, stopped: bool = False) -> None:
        super().__init__("the reply was ended early")
        self.text = text
        self.stopped = stopped

#: After a tool result with sources: how the model is asked to cite them.
SOURCES_HEADING = "\n\nSources of this tool output (cite them in your answer as [n] where you use them):"
_CITED = re.compile(r"\[(\d{1,3})\]")


class SpendHook(Protocol):
    """Told of each model call (`shared/budgets.py`'s `TurnSpend`): `before_call` reserves its
    worst case (`prompt_tokens()`, the request's estimate, counted only if a budget needs it,
    plus the reply's maximum) and raises `BudgetExhausted` when a budget has no room;
    `after_call` settles what the call cost."""

    async def before_call(self, prompt_tokens: Callable[[], int]) -> None: ...

    async def after_call(self, usage: Usage, *, model: str) -> None: ...


@dataclass
class _Tally:
    """What a turn's model calls billed so far, and the estimate of the one under way."""

    usage: Usage = field(default_factory=Usage)
    pending: Callable[[], int] | None = None


class ToolSource(Protocol):
    """Tools found at run time (an MCP server's); `functions()` is cheap once they are cached."""

    async def functions(self) -> tuple[Function, ...]: ...


def summary_message(summary: str) -> dict[str, Any]:
    """The summary as the model reads it: quoted conversation data, in a user-role message."""
    return {"role": "user", "content": SUMMARY_HEADING + json.dumps(summary, ensure_ascii=False)}


def check_input(text: str, *, token_budget: int) -> int:
    """The tokens the new message costs; `MessageTooLarge` / `InputTooLong` if it cannot be sent.

    The one check of a new message: the webhook and `ConversationMemory.load` both call it.
    """
    if len(text) > MAX_MESSAGE_CHARS:
        raise MessageTooLarge(f"a message holds at most {MAX_MESSAGE_CHARS:,} characters")
    tokens = count_message_tokens(ChatMessage(role="user", content=text))
    if tokens > token_budget:
        raise InputTooLong(f"the message needs about {tokens:,} tokens; the budget for a turn is "
                           f"{token_budget:,}", tokens=tokens, budget=token_budget)
    return tokens


class ConversationMemory:
    """One conversation's durable memory, read as a token-budgeted window.

    `load()` reads the window (`get_all()` returns it); `commit()` appends a prompt's turn
    atomically, failing with `ConversationConflict` if another turn got there first;
    `set_all([])` clears the conversation.
    """

    def __init__(self, store: ConversationStore, conversation_id: str, *, token_budget: int = 8_000,
                 max_messages: int = 200) -> None:
        self.store = store
        self.conversation_id = conversation_id
        self.token_budget = token_budget
        self.max_messages = max_messages
        self.window: ConversationWindow | None = None

    async def load(self, *, input: str | None = None, activity_id: str | None = None) -> ConversationWindow:
        """(Re)load the window, leaving room in the budget for `input`, the new message."""
        reserve = check_input(input, token_budget=self.token_budget) if input is not None else 0
        self.window = await self.store.load_window(
            self.conversation_id, token_budget=self.token_budget - reserve,
            max_messages=self.max_messages, activity_id=activity_id)
        return self.window

    @property
    def summary(self) -> str | None:
        """The rolling summary of what came before the loaded window (None: none, or not loaded)."""
        return self.window.summary if self.window is not None else None

    async def get_all(self) -> list[ChatMessage]:
        window = self.window or await self.load()
        return list(window.messages)

    async def set_all(self, messages: Sequence[ChatMessage]) -> None:
        """Only `set_all([])` is supported: it clears the conversation (every row)."""
        if messages:
            raise ValueError("a durable memory is appended to by turns; set_all takes only []")
        await self.store.clear(self.conversation_id)
        self.window = None

    async def commit(self, result: PromptResult, *, activity_id: str) -> StoredTurn:
        if self.window is None:
            raise ValueError("load() the memory before committing a turn to it")
        return await self.store.commit_turn(self.window, activity_id=activity_id,
                                            messages=result.messages)


@dataclass(frozen=True, kw_only=True)
class UserInput:
    """A user message of the turn other than `send`'s `input`: an earlier message of a burst,
    answered together with it (`shared/order.py`), with who wrote it and what came with it."""

    text: str
    speaker: str | None = None
    sender: Sender | None = None
    attachments: Incoming | None = None
    #: The message's own activity (a burst stores each with its own).
    activity_id: str | None = None

    def message(self) -> ChatMessage:
        return ChatMessage(role="user", content=self.text, name=self.speaker, sender=self.sender,
                           attachments=self.attachments.stored if self.attachments else (),
                           activity_id=self.activity_id)


@dataclass(frozen=True, kw_only=True)
class PromptResult:
    """A prompt's turn: `response` is the final reply; `messages` all the turn will store."""

    response: ChatMessage
    messages: tuple[ChatMessage, ...]
    usage: Usage
    model: str
    #: Follow-ups the model suggested at the end of `response` (taken off its text).
    suggestions: tuple[str, ...] = ()


class ChatPrompt:
    def __init__(self, model: ChatModel, *, functions: Sequence[Function] = (),
                 instructions: str | None = None, max_tool_rounds: int = 5,
                 tool_timeout_seconds: float = 10.0, timeout_seconds: float = 60.0,
                 speaker_style: SpeakerStyle = "name",
                 tool_sources: Sequence[ToolSource] = (), suggested_replies: bool = False) -> None:
        """`speaker_style`: how a group chat's speaker is sent, `name` (OpenAI, Azure OpenAI) or
        a `prefix` of the text (other compatible servers). `tool_sources`: more tools, asked for
        on each turn (a name already taken by `functions` stays theirs). `suggested_replies`: the
        model ends its answer with follow-ups (`shared/suggestions.py`), returned in
        `suggestions`."""
        self.model = model
        self.suggested_replies = suggested_replies
        self.speaker_style: SpeakerStyle = speaker_style
        self.instructions = instructions
        self.functions: dict[str, Function] = {}
        self.max_tool_rounds = max_tool_rounds
        self.tool_timeout_seconds = tool_timeout_seconds
        self.timeout_seconds = timeout_seconds
        for function in functions:
            if function.name in self.functions:
                raise ValueError(f"a tool named {function.name!r} is registered already")
            self.functions[function.name] = function
        self.tool_sources = tuple(tool_sources)
        self._found: tuple[tuple[Function, ...], ...] = ()
        self._all: tuple[dict[str, Function], list[dict[str, Any]] | None] = (self.functions, None)

    @functools.cached_property
    def _tools(self) -> list[dict[str, Any]] | None:
        """The specs of `functions`, made on the first turn (pydantic is not loaded before)."""
        return [function.spec() for function in self.functions.values()] or None

    async def current_tools(self) -> tuple[dict[str, Function], list[dict[str, Any]] | None]:
        """This turn's tools by name, and their specs (rebuilt only when a source's list changed)."""
        if not self.tool_sources:
            return self.functions, self._tools
        if len(self.tool_sources) == 1:  # the usual case: no gather (its tasks cost 10 µs)
            found: tuple[tuple[Function, ...], ...] = (await self.tool_sources[0].functions(),)
        else:
            found = tuple(await asyncio.gather(*(s.functions() for s in self.tool_sources)))
        if len(found) != len(self._found) or any(a is not b for a, b in zip(found, self._found,
                                                                              strict=True)):
            functions = dict(self.functions)
            for function in (f for listed in found for f in listed):
                if function.name in functions:
                    log.warning("tool %s (%s) left out: the name is taken", function.name,
                                function.origin)
                    continue
                functions[function.name] = function
            self._found = found
            self._all = (functions, [f.spec() for f in functions.values()] or None)
        return self._all

    async def send(self, input: str, *, history: Sequence[ChatMessage] = (),
                   memory: ConversationMemory | None = None, instructions: str | None = None,
                   summary: str | None = None, speaker: str | None = None,
                   sender: Sender | None = None,
                   on_text: TextListener | None = None,
                   on_tools: ToolListener | None = None,
                   attachments: Incoming | None = None,
                   earlier: Sequence[UserInput] = (),
                   activity_id: str | None = None,
                   spend: SpendHook | None = None) -> PromptResult:
        """Ask the model after `summary` and `history` (or `memory`'s, loaded if need be); run
        the tools it calls; return the turn without storing anything. `speaker`: who wrote
        `input`, in a group chat (stored with it and sent as `speaker_style` says); `sender`:
        their IDs, stored with the message only (a user's data requests find it by them).

        `on_text`: the model streams, and the listener gets each round's text so far (it may
        raise `ReplyStopped` to end the reply); `on_tools`: told of each round's tool calls.
        `attachments`: what came with `input` (`shared/attachments.py`): its images go to the
        model with it, its description is stored with it. `earlier`: the user messages of a
        burst sent before `input`, answered with it in one reply; `activity_id`: `input`'s
        activity, when a burst's messages each keep their own. `spend`: told before and after
        each model call (a budget with no room for the first raises `BudgetExhausted`: no call
        made). A `ModelError` raised carries what the calls billed (`billed`)."""
        if memory is not None:
            window = memory.window or await memory.load(input=input)
            history, summary = window.messages, window.summary
        inputs = [*earlier, UserInput(text=input, speaker=speaker, sender=sender,
                                      attachments=attachments,
                                      activity_id=activity_id if earlier else None)]
        users = [item.message() for item in inputs]
        system = instructions if instructions is not None else self.instructions
        if self.suggested_replies:
            system = ((system or "") + suggestions.INSTRUCTION).lstrip()
            on_text = suggestions.holding_back(on_text)
        request = ([{"role": "system", "content": system}] if system else []) + \
            ([summary_message(summary)] if summary else []) + \
            [wire_message(message, style=self.speaker_style) for message in history]
        for item, message in zip(inputs, users, strict=True):
            wired = wire_message(message, style=self.speaker_style)
            request.append(item.attachments.wire(wired) if item.attachments else wired)
        tally = _Tally()
        try:
            async with asyncio.timeout(self.timeout_seconds):
                turn, usage, model = await self._run(request, users, on_text, on_tools, spend,
                                                     tally)
        except TimeoutError as exc:
            timeout = ModelTimeout(f"the model took over {self.timeout_seconds:g} s in all")
            if tally.pending is not None:  # a call cut by the deadline: billed as its request
                await self._settle(spend, tally, Usage(prompt_tokens=tally.pending()), None)
            timeout.billed = tally.usage
            raise timeout from exc
        except ModelError as exc:
            exc.billed = tally.usage
            raise
        suggested: tuple[str, ...] = ()
        if self.suggested_replies and turn[-1].content:
            text, suggested = suggestions.split(turn[-1].content)
            turn[-1] = replace(turn[-1], content=text)
        return PromptResult(response=turn[-1], messages=tuple(turn), usage=usage, model=model,
                            suggestions=suggested)

    async def _run(self, request: list[dict[str, Any]], users: list[ChatMessage],
                   on_text: TextListener | None, on_tools: ToolListener | None,
                   spend: SpendHook | None,
                   tally: _Tally) -> tuple[list[ChatMessage], Usage, str]:
        conversation = list(request)
        turn: list[ChatMessage] = list(users)
        model = self.model.model
        functions, tools = await self.current_tools()
        sources: list[Source] = []  # the turn's, numbered from 1 as the model cites them
        for round_number in range(self.max_tool_rounds + 1):
            try:
                completion = await self._call(conversation, tools, on_text, spend, tally)
            except ReplyStopped as stop:
                ended = ChatMessage(role="assistant", content=stop.text, model=model,
                                    stopped=stop.stopped, citations=cited(stop.text, sources))
                return [*turn, ended], tally.usage, model
            except BudgetExhausted as exhausted:
                if round_number == 0:
                    raise  # nothing paid for: the turn is refused
                log.info("a budget has no room for tool round %d; stopping", round_number + 1)
                return [*turn, _polite(BUDGET_STOP_REPLY.format(reason=exhausted.reply),
                                       model)], tally.usage, model
            usage, model = tally.usage, completion.model
            message = completion.message
            if not message.tool_calls:
                return [*turn, _final(message, sources)], usage, model
            if round_number == self.max_tool_rounds:
                log.warning("the model still called tools after %d rounds; stopping", round_number)
                return [*turn, _polite(ROUND_LIMIT_REPLY.format(rounds=round_number), model)], \
                    usage, model
            # The calls must fit in the turn before any runs: a reply may ask for hundreds.
            if not _fits([*turn, message, *(_result(call, "") for call in message.tool_calls)]):
                log.warning("the model asked for %d tool calls; more than a turn can keep",
                            len(message.tool_calls))
                return [*turn, _polite(TURN_LIMIT_REPLY, model)], usage, model
            if on_tools is not None:
                await on_tools(message.tool_calls)
            done = await asyncio.gather(*(self._invoke(call, functions)
                                          for call in message.tool_calls))
            results = [_result(call, _with_sources(result, sources))
                       for call, result in zip(message.tool_calls, done, strict=True)]
            step = [message, *results]
            if not _fits([*turn, *step]):
                return [*turn, _polite(TURN_LIMIT_REPLY, model)], usage, model
            turn += step
            conversation += [item.to_openai() for item in step]
        raise AssertionError("unreachable")  # pragma: no cover

    async def _call(self, conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                    on_text: TextListener | None, spend: SpendHook | None,
                    tally: _Tally) -> Completion:
        """One model call, its worst case reserved first (`spend`) and what it cost settled
        after; billed in `tally` however it ends. A call cut (`ReplyStopped`) or failed before
        its usage arrived counts as its request (an estimate, never nothing) and the text read."""
        # Counted only when needed (a budget's reservation, a call that ends without its usage):
        # tokenizing the whole request costs CPU a turn without budgets need not pay.
        request = list(conversation)
        estimate = functools.cache(
            lambda: count_request_tokens(request, tools, model=self.model.model))
        if spend is not None:
            await spend.before_call(estimate)
        tally.pending = estimate
        try:
            completion = await self.model.complete(conversation, tools=tools, on_text=on_text)
        except ReplyStopped as stop:
            await self._settle(spend, tally, Usage(prompt_tokens=estimate(),
                                                   completion_tokens=count_text_tokens(stop.text)),
                               None)
            raise
        except ModelError:
            await self._settle(spend, tally, Usage(prompt_tokens=estimate()), None)
            raise
        await self._settle(spend, tally, completion.usage, completion.model)
        return completion

    async def _settle(self, spend: SpendHook | None, tally: _Tally, usage: Usage,
                      model: str | None) -> None:
        tally.usage, tally.pending = tally.usage + usage, None
        if spend is not None:
            await spend.after_call(usage, model=model or self.model.model)

    async def _invoke(self, call: ToolCall, functions: dict[str, Function]) -> ToolResult:
        function = functions.get(call.name)
        origin = function.origin if function is not None else "unknown"
        with telemetry.tool_call(name=call.name, call_id=call.id, arguments=call.arguments,
                                 origin=origin) as span:
            if function is None:
                result = failed(call, f"there is no tool named {call.name}")
            else:
                result = await function.invoke(call, time_limit=self.tool_timeout_seconds)
            if result.failed:  # a failure the model is told of (shared/tools.py)
                span.set_attribute("error.type", "tool_error")
            # An unknown name is the model's text: the metric counts it as `unknown`.
            telemetry.tool_result(span, result.text, origin=origin, failed=result.failed,
                                  name=function.name if function is not None else "unknown")
            return result


def _result(call: ToolCall, content: str) -> ChatMessage:
    return ChatMessage(role="tool", content=content, tool_call_id=call.id, name=call.name)


def _polite(text: str, model: str) -> ChatMessage:
    return ChatMessage(role="assistant", content=text, model=model)


def _final(message: ChatMessage, sources: Sequence[Source] = ()) -> ChatMessage:
    content = message.content or ""
    if len(content) > MAX_MESSAGE_CHARS:
        content = content[:MAX_MESSAGE_CHARS - 20] + " …[reply truncated]"
    return ChatMessage(role="assistant", content=content, model=message.model, usage=message.usage,
                       citations=cited(content, sources))


def cited(text: str, sources: Sequence[Source]) -> tuple[Citation, ...]:
    """The sources `text` cites as [n] (n counts the turn's sources from 1), in order of n."""
    positions = sorted({int(n) for n in _CITED.findall(text) if 1 <= int(n) <= len(sources)})
    return tuple(Citation(position=n, title=sources[n - 1].title, url=sources[n - 1].url,
                          snippet=sources[n - 1].snippet) for n in positions)


def _with_sources(result: ToolResult, sources: list[Source]) -> str:
    """The result's text, then its sources numbered after the turn's earlier ones."""
    if not result.sources:
        return result.text
    lines = [SOURCES_HEADING]
    for source in result.sources:
        sources.append(source)
        lines.append(f"[{len(sources)}] {source.title}" + (f" <{source.url}>" if source.url else "")
                     + (f": {source.snippet}" if source.snippet else ""))
    return result.text + "\n".join(lines)


def _fits(messages: list[ChatMessage]) -> bool:
    """Whether `messages` plus a final reply can still be stored as one turn."""
    try:
        check_turn([*messages, ChatMessage(role="assistant", content=_REPLY_ROOM)])
    except (TurnTooLarge, MessageTooLarge):
        return False
    return True
