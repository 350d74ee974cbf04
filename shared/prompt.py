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
there); their definitions take at most `tools_token_budget` tokens of a request (`tools_tokens`
says how many they take, for the history window's budget). Sources a tool returns are numbered
for the turn and listed after its result; the model is asked to cite them as [n], and the reply
keeps the ones it cites as `citations`.

A round in which the model calls an `ask` tool runs none of its calls: `send` raises
`ToolCallsHeld` with the turn so far (`shared/pause.py`), and `resume` goes on from there once a
person has decided.

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
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
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
from .messages import ChatMessage, Citation, Sender, StoredTurn, ToolCall, ToolDecision, Usage
from .model import ChatModel, Completion
from .pause import HeldCall, PausedTurn, ToolCallsHeld, declined_reason
from .policy import ToolPolicy
from .speakers import SpeakerStyle, wire_message
from .store import MAX_MESSAGE_CHARS, ConversationStore, ConversationWindow, check_turn
from .tokens import count_message_tokens, count_request_tokens, count_text_tokens
from .tools import UNKNOWN_TOOL, Function, Source, ToolResult, failed

__all__ = ["BUDGET_STOP_REPLY", "ROUND_LIMIT_REPLY", "TOOL_OVERHEAD", "TURN_LIMIT_REPLY",
           "ChatPrompt", "ConversationMemory", "PromptResult", "ReplyStopped", "RunOnce",
           "SpendHook", "ToolListener", "ToolSource", "UserInput", "check_input"]

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
                 tool_sources: Sequence[ToolSource] = (), suggested_replies: bool = False,
                 tools_token_budget: int = 4_000) -> None:
        """`speaker_style`: how a group chat's speaker is sent, `name` (OpenAI, Azure OpenAI) or
        a `prefix` of the text (other compatible servers). `tool_sources`: more tools, asked for
        on each turn (a name already taken by `functions` stays theirs). `suggested_replies`: the
        model ends its answer with follow-ups (`shared/suggestions.py`), returned in
        `suggestions`. `tools_token_budget`: the tokens the tool definitions of a request may
        take (`functions` first, then the sources' in order; the rest are left out)."""
        self.model = model
        self.suggested_replies = suggested_replies
        self.speaker_style: SpeakerStyle = speaker_style
        self.instructions = instructions
        self.functions: dict[str, Function] = {}
        self.max_tool_rounds = max_tool_rounds
        self.tool_timeout_seconds = tool_timeout_seconds
        self.timeout_seconds = timeout_seconds
        self.tools_token_budget = tools_token_budget
        for function in functions:
            if function.name in self.functions:
                raise ValueError(f"a tool named {function.name!r} is registered already")
            self.functions[function.name] = function
        self.tool_sources = tuple(tool_sources)
        self._found: tuple[tuple[Function, ...], ...] = ()
        #: This turn's offered tools (by name, their specs, their tokens), built on the first
        #: turn (pydantic is not loaded before), again when a source's list changed.
        self._all: _Offer | None = None

    async def current_tools(self) -> tuple[dict[str, Function], list[dict[str, Any]] | None]:
        """This turn's tools by name, and their specs (rebuilt only when a source's list changed)."""
        functions, specs, _ = await self._current()
        return functions, specs

    async def tools_tokens(self) -> int:
        """The tokens this turn's tool definitions take in each request."""
        return (await self._current())[2]

    async def _current(self) -> _Offer:
        if not self.tool_sources:
            if self._all is None:
                self._all = self._offered(self.functions.values())
            return self._all
        if len(self.tool_sources) == 1:  # the usual case: no gather (its tasks cost 10 µs)
            found: tuple[tuple[Function, ...], ...] = (await self.tool_sources[0].functions(),)
        else:
            found = tuple(await asyncio.gather(*(s.functions() for s in self.tool_sources)))
        if self._all is None or len(found) != len(self._found) or \
                any(a is not b for a, b in zip(found, self._found, strict=True)):
            self._found = found  # a source's list changed (a discovery): warnings once per change
            self._all = self._offered([*self.functions.values(), *(f for fs in found for f in fs)])
        return self._all

    def _offered(self, candidates: Iterable[Function]) -> _Offer:
        """The tools a request offers: by name (the first one with a name keeps it), never-tools
        left out, their definitions within `tools_token_budget`; their specs and tokens."""
        functions: dict[str, Function] = {}
        specs: list[dict[str, Any]] = []
        tokens = 0
        for function in candidates:
            if function.name in functions:
                log.warning("tool %s (%s) left out: the name is taken", function.name,
                            function.origin)
                continue
            if function.policy is ToolPolicy.NEVER:
                continue
            try:
                spec = function.spec()
            except ValueError as exc:  # a definition too long (ours: it names no outside text)
                log.warning("tool %s (%s) left out: %s", function.name, function.origin, exc)
                continue
            cost = count_text_tokens(json.dumps(spec, ensure_ascii=False)) + TOOL_OVERHEAD
            if tokens + cost > self.tools_token_budget:
                log.warning("tool %s (%s) left out: the tools of a request may take %d tokens "
                            "(CHAT_TOOLS_TOKEN_BUDGET); this one needs %d more",
                            function.name, function.origin, self.tools_token_budget, cost)
                continue
            functions[function.name] = function
            specs.append(spec)
            tokens += cost
        return functions, specs or None, tokens

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
        system, on_text = self._system(instructions, on_text)
        request = self._request(system, summary, history)
        for item, message in zip(inputs, users, strict=True):
            wired = wire_message(message, style=self.speaker_style)
            request.append(item.attachments.wire(wired) if item.attachments else wired)
        loop = _Loop(conversation=request, turn=users, model=self.model.model, spend=spend)
        return await self._finish(loop, on_text, on_tools, None)

    async def resume(self, paused: PausedTurn, decisions: Mapping[str, ToolDecision], *,
                     history: Sequence[ChatMessage] = (), summary: str | None = None,
                     instructions: str | None = None, on_text: TextListener | None = None,
                     on_tools: ToolListener | None = None,
                     run_once: RunOnce | None = None,
                     spend: SpendHook | None = None) -> PromptResult:
        """Go on with a turn that `send` (or an earlier `resume`) paused (`ToolCallsHeld`), after
        `summary` and `history` as they are now: the held round runs, each held call as its
        decision (by call ID) says (`shared/pause.py`), and the turn continues with the model.
        Its result holds the whole turn, from the user's message(s) on; it may pause again.
        `run_once`: runs each call of the held round (given how to run it) at most once, across
        attempts and workers (`shared/approvals.py` records them). `spend`, and what a
        `ModelError` carries (`billed`), count the model calls made after the pause only (those
        before it were billed when it paused); the result's `usage` is the whole turn's."""
        system, on_text = self._system(instructions, on_text)
        loop = _Loop(conversation=self._request(system, summary, [*history, *paused.messages]),
                     turn=list(paused.messages[:-1]), base=paused.usage, model=paused.model,
                     sources=list(paused.sources), rounds=paused.rounds + 1, run_once=run_once,
                     spend=spend)
        return await self._finish(loop, on_text, on_tools, (paused.messages[-1], decisions))

    def _system(self, instructions: str | None,
                on_text: TextListener | None) -> tuple[str | None, TextListener | None]:
        system = instructions if instructions is not None else self.instructions
        if self.suggested_replies:
            system = ((system or "") + suggestions.INSTRUCTION).lstrip()
            on_text = suggestions.holding_back(on_text)
        return system, on_text

    def _request(self, system: str | None, summary: str | None,
                 messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
        return ([{"role": "system", "content": system}] if system else []) + \
            ([summary_message(summary)] if summary else []) + \
            [wire_message(message, style=self.speaker_style) for message in messages]

    async def _finish(self, loop: _Loop, on_text: TextListener | None,
                      on_tools: ToolListener | None, decided: _Decided | None) -> PromptResult:
        tally = loop.tally
        try:
            async with asyncio.timeout(self.timeout_seconds):
                turn = await self._run(loop, on_text, on_tools, decided)
        except TimeoutError as exc:
            timeout = ModelTimeout(f"the model took over {self.timeout_seconds:g} s in all")
            if tally.pending is not None:  # a call cut by the deadline: billed as its request
                await self._settle(loop.spend, tally, Usage(prompt_tokens=tally.pending()), None)
            timeout.billed = tally.usage
            raise timeout from exc
        except ModelError as exc:
            exc.billed = tally.usage
            raise
        suggested: tuple[str, ...] = ()
        if self.suggested_replies and turn[-1].content:
            text, suggested = suggestions.split(turn[-1].content)
            turn[-1] = replace(turn[-1], content=text)
        return PromptResult(response=turn[-1], messages=tuple(turn), usage=loop.usage,
                            model=loop.model, suggestions=suggested)

    async def _run(self, loop: _Loop, on_text: TextListener | None,
                   on_tools: ToolListener | None, decided: _Decided | None) -> list[ChatMessage]:
        turn, sources = loop.turn, loop.sources
        functions, tools = await self.current_tools()
        if decided is not None:  # a resumed turn: its held round first, as decided
            message, decisions = decided
            if (ended := await self._round(loop, message, functions, on_tools, decisions)):
                return ended
        for round_number in range(loop.rounds, self.max_tool_rounds + 1):
            try:
                completion = await self._call(loop.conversation, tools, on_text, loop.spend,
                                              loop.tally)
            except ReplyStopped as stop:
                return [*turn, ChatMessage(role="assistant", content=stop.text, model=loop.model,
                                           stopped=stop.stopped,
                                           citations=cited(stop.text, sources))]
            except BudgetExhausted as exhausted:
                if round_number == 0:
                    raise  # nothing paid for: the turn is refused
                log.info("a budget has no room for tool round %d; stopping", round_number + 1)
                return [*turn, _polite(BUDGET_STOP_REPLY.format(reason=exhausted.reply),
                                       loop.model)]
            loop.model = completion.model
            message = completion.message
            if not message.tool_calls:
                return [*turn, _final(message, sources)]
            if round_number == self.max_tool_rounds:
                log.warning("the model still called tools after %d rounds; stopping", round_number)
                return [*turn, _polite(ROUND_LIMIT_REPLY.format(rounds=round_number), loop.model)]
            # The calls must fit in the turn before any runs: a reply may ask for hundreds.
            if not _fits([*turn, message, *(_result(call, "") for call in message.tool_calls)]):
                log.warning("the model asked for %d tool calls; more than a turn can keep",
                            len(message.tool_calls))
                return [*turn, _polite(TURN_LIMIT_REPLY, loop.model)]
            if held := _held(message.tool_calls, functions):
                log.info("the model called %d tool(s) that need a decision first; pausing the turn",
                         len(held))
                for call in message.tool_calls:
                    if any(h.call_id == call.id for h in held):
                        telemetry.tool_decided(name=call.name, origin=functions[call.name].origin,
                                               reason="approval", outcome="held")
                raise ToolCallsHeld(PausedTurn(messages=(*turn, message), held=held,
                                               usage=loop.usage, model=loop.model,
                                               sources=tuple(sources), rounds=round_number))
            if (ended := await self._round(loop, message, functions, on_tools, {})):
                return ended
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

    async def _round(self, loop: _Loop, message: ChatMessage, functions: dict[str, Function],
                     on_tools: ToolListener | None,
                     decisions: Mapping[str, ToolDecision]) -> list[ChatMessage] | None:
        """Run one round's calls (a held call as its decision says) and add them to the turn;
        the turn's end instead when their results do not fit in it."""
        if on_tools is not None:
            await on_tools(message.tool_calls)
        run_once = loop.run_once if decisions else None  # only a resumed round's calls
        done = await asyncio.gather(*(self._invoke(call, functions, decisions.get(call.id),
                                                   run_once) for call in message.tool_calls))
        results = [replace(_result(call, _with_sources(result, loop.sources)),
                           decision=decisions.get(call.id))
                   for call, result in zip(message.tool_calls, done, strict=True)]
        step = [message, *results]
        if not _fits([*loop.turn, *step]):
            return [*loop.turn, _polite(TURN_LIMIT_REPLY, loop.model)]
        loop.turn += step
        loop.conversation += [item.to_openai() for item in step]
        return None

    async def _invoke(self, call: ToolCall, functions: dict[str, Function],
                      decision: ToolDecision | None = None,
                      run_once: RunOnce | None = None) -> ToolResult:
        """Run one call (through `run_once` when given); a held one only when its decision
        approved exactly these arguments."""
        function = functions.get(call.name)
        # A name the model invented is its text: logs, spans and metrics call it `unknown`.
        name = function.name if function is not None else UNKNOWN_TOOL
        origin = function.origin if function is not None else "unknown"
        with telemetry.tool_call(name=name, call_id=call.id, arguments=call.arguments,
                                 origin=origin) as span:
            declined = declined_reason(decision, call) if decision is not None else None
            if function is None:
                result = failed(call, f"unknown tool: there is no tool named {call.name}",
                                known=False)
            elif declined is not None:
                result = failed(call, declined)
            else:
                def run() -> Awaitable[ToolResult]:
                    return function.invoke(call, time_limit=self.tool_timeout_seconds,
                                           approved=decision is not None)

                result = await (run_once(call, run) if run_once is not None else run())
            if decision is not None:
                span.set_attribute("chatstate.tool.decision", decision.outcome)
            if result.failed:  # a failure the model is told of (shared/tools.py)
                span.set_attribute("error.type", "tool_error")
            telemetry.tool_result(span, result.text, origin=origin, failed=result.failed,
                                  name=name)
            return result


#: The tools a request offers: by name, their specs (None: none), and the tokens those take.
_Offer = tuple[dict[str, Function], list[dict[str, Any]] | None, int]
#: A resumed turn's held round: the assistant message asking for it, and the decisions by call ID.
_Decided = tuple[ChatMessage, Mapping[str, ToolDecision]]
#: Tokens of a tool definition's framing in a request, beyond its JSON.
TOOL_OVERHEAD = 8
#: Runs a call at most once: given the call and how to run it, its result (recorded or run now).
RunOnce = Callable[[ToolCall, Callable[[], Awaitable[ToolResult]]], Awaitable[ToolResult]]


@dataclass(kw_only=True)
class _Loop:
    """One turn's state through the tool loop: what the model is sent, what the turn stores,
    what it has cost, and where it is."""

    conversation: list[dict[str, Any]]
    turn: list[ChatMessage]
    model: str
    #: What the turn's model calls cost before a pause (billed then); `tally`, since.
    base: Usage = field(default_factory=Usage)
    tally: _Tally = field(default_factory=_Tally)
    spend: SpendHook | None = None
    #: The turn's sources, numbered from 1 as the model cites them.
    sources: list[Source] = field(default_factory=list)
    #: The index of the next model call (tool rounds run so far).
    rounds: int = 0
    #: A resumed turn's: runs each call of its held round at most once.
    run_once: RunOnce | None = None

    @property
    def usage(self) -> Usage:
        """What the whole turn's model calls cost."""
        return self.base + self.tally.usage


def _held(calls: Sequence[ToolCall], functions: dict[str, Function]) -> tuple[HeldCall, ...]:
    """The round's calls that may not run before a person decides, and why."""
    return tuple(HeldCall(call_id=call.id, reason="approval") for call in calls
                 if (function := functions.get(call.name)) is not None
                 and function.policy is ToolPolicy.ASK)


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
