"""Choosing the history window: the newest whole turns that fit a token budget and a message cap,
and, with a rolling summary, a window whose start stays still between large steps (`WindowPlanner`).

Messages are offered newest first. They are grouped into turns (a user message and everything after
it up to the next user message), and a turn is taken whole or not at all, so the window always
starts at a user message and never splits an assistant's tool calls from their results.
"""

from __future__ import annotations

from dataclasses import dataclass

from .messages import ChatMessage

__all__ = ["WindowBuilder", "WindowPlan", "WindowPlanner"]


class WindowBuilder:
    def __init__(self, *, token_budget: int, max_messages: int) -> None:
        self._budget = token_budget
        self._max_messages = max_messages
        self._taken: list[ChatMessage] = []  # newest first
        self._tokens = 0
        self._pending: list[ChatMessage] = []  # the turn being assembled, newest first
        self._pending_tokens = 0
        self.full = False

    def offer(self, message: ChatMessage, tokens: int) -> bool:
        """Take `message` (older than all before it); False once the window can take no more."""
        if self.full:
            return False
        self._pending.append(message)
        self._pending_tokens += tokens
        if message.role != "user":
            if self._pending_tokens > self._budget - self._tokens:
                self.full = True  # even this turn's tail does not fit: no older turn can either
            return not self.full
        fits_tokens = self._tokens + self._pending_tokens <= self._budget
        fits_count = len(self._taken) + len(self._pending) <= self._max_messages
        if fits_tokens and fits_count:
            self._taken.extend(self._pending)
            self._tokens += self._pending_tokens
        else:
            self.full = True
        self._pending, self._pending_tokens = [], 0
        if len(self._taken) >= self._max_messages:
            self.full = True
        return not self.full

    @property
    def token_budget(self) -> int:
        return self._budget

    @property
    def max_messages(self) -> int:
        return self._max_messages

    @property
    def messages(self) -> list[ChatMessage]:
        """The chosen window, oldest first."""
        return list(reversed(self._taken))

    @property
    def tokens(self) -> int:
        return self._tokens


@dataclass(frozen=True, kw_only=True)
class WindowPlan:
    """The window chosen for a turn, and what its commit does to the window's start."""

    messages: list[ChatMessage]
    tokens: int
    #: Sequence number of the window's first message (None: an empty window).
    first_seq: int | None
    #: The commit makes the prepared summary current and moves the start to its end + 1.
    step: bool = False
    #: The window starts after the summary's end: some messages are in neither until the summary
    #: catches up (the summary model failed or fell behind; the window then slides as before).
    behind: bool = False


class _Candidate:
    def __init__(self, floor: int, *, token_budget: int, max_messages: int) -> None:
        self.floor = floor
        self.builder = WindowBuilder(token_budget=token_budget, max_messages=max_messages)
        self.done = False
        self.newest: int | None = None

    def offer(self, seq: int, message: ChatMessage, tokens: int) -> None:
        if self.done:
            return
        if seq < self.floor:
            self.done = True
            return
        self.newest = seq if self.newest is None else self.newest
        self.done = not self.builder.offer(message, tokens)

    @property
    def fits(self) -> bool:
        """Every message from `floor` on fitted (the builder never filled up)."""
        return not self.builder.full

    def plan(self, *, step: bool = False, behind: bool = False) -> WindowPlan:
        taken = self.builder.messages
        first = self.newest - len(taken) + 1 if taken and self.newest is not None else None
        return WindowPlan(messages=taken, tokens=self.builder.tokens, first_seq=first, step=step,
                          behind=behind)


class WindowPlanner:
    """Chooses a window that keeps the prompt's prefix still, over messages offered newest first.

    With a summary (`start` given: the first message the summary does not cover), three windows
    are weighed at once, in one pass:

        still   every message from `start`: while it fits, the prompt repeats the previous one's
                prefix (instructions, summary, the same oldest messages) and only grows at its end
        step    every message from `step_to` (the end of a prepared summary + 1): the window's
                start moves forward in one large step and the summary changes, together
        newest  the newest whole turns that fit (`WindowBuilder` alone): when neither fits (no
                summary was ready in time), or with summaries off (`start` None)

    Sequence numbers of offered messages are consecutive, newest first; `visible_from` is the
    first one not hidden by a clear.
    """

    def __init__(self, *, token_budget: int, max_messages: int, visible_from: int = 1,
                 start: int | None = None, step_to: int | None = None) -> None:
        limits = {"token_budget": token_budget, "max_messages": max_messages}
        self.token_budget, self.max_messages = token_budget, max_messages
        self._still = _Candidate(max(start, visible_from), **limits) if start is not None else None
        self._step = _Candidate(step_to, **limits) \
            if start is not None and step_to is not None and step_to > start else None
        self._newest = _Candidate(visible_from, **limits)

    @property
    def _candidates(self) -> list[_Candidate]:
        return [c for c in (self._still, self._step, self._newest) if c is not None]

    def offer(self, seq: int, message: ChatMessage, tokens: int) -> bool:
        """Offer the next older message; False once no candidate needs older ones."""
        for candidate in self._candidates:
            candidate.offer(seq, message, tokens)
        return not self.settled

    def reached(self, seq: int) -> bool:
        """Every message from `seq` on has been offered; True if that settles the window."""
        for candidate in self._candidates:
            candidate.done = candidate.done or seq <= candidate.floor
        return self.settled

    @property
    def settled(self) -> bool:
        return all(candidate.done for candidate in self._candidates)

    def plan(self) -> WindowPlan:
        if self._still is None:
            return self._newest.plan()
        if self._still.fits:
            return self._still.plan()
        if self._step is not None and self._step.fits:
            return self._step.plan(step=True)
        return self._newest.plan(step=self._step is not None, behind=True)
