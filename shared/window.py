"""Choosing the history window: the newest whole turns that fit a token budget and a message cap.

Messages are offered newest first. They are grouped into turns (a user message and everything after
it up to the next user message), and a turn is taken whole or not at all, so the window always
starts at a user message and never splits an assistant's tool calls from their results.
"""

from __future__ import annotations

from .messages import ChatMessage

__all__ = ["WindowBuilder"]


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
