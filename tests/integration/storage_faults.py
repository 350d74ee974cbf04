"""Storage calls held or failed on cue: an azure-core per-call policy on a real `TableClient`.

The race tests build their stores with `faulty_store` (and the order tests their inboxes, through
`halves`' policies): the policy sees every request the client sends to Azurite, and a `Gate` can
hold one (until the test lets it go), `fail_next` fail the next that matches, or a `Faults` plan
can delay or fail it, so an interleaving is made, not hoped for.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from azure.core.exceptions import ServiceRequestError
from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import AsyncHTTPPolicy
from azure.data.tables.aio import TableClient

from shared.store import TableConversationStore

__all__ = ["Faults", "Gate", "StoragePolicy", "failing", "faulty_store"]

Match = Callable[[str, str], bool]  # (method, URL) → whether this request is the one


@dataclass
class Gate:
    """Hold the `nth` request that `match`es until `release()`; `reached` is set when it arrives."""

    match: Match
    nth: int = 1
    seen: int = 0
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self.released.set()


@dataclass
class Faults:
    """A seeded plan of delays and failures: each request is delayed up to `max_delay` s with
    probability `delay_rate`, and fails before it is sent with probability `fail_rate` (or after
    it was sent, its answer lost, with probability `lose_rate`)."""

    rng: random.Random
    delay_rate: float = 0.0
    max_delay: float = 0.0
    fail_rate: float = 0.0
    lose_rate: float = 0.0
    injected: int = 0


class StoragePolicy(AsyncHTTPPolicy):  # type: ignore[type-arg]
    """Runs each request past the gates and the fault plan, then sends it."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: list[Gate] = []
        self.faults: Faults | None = None
        #: Fail the next request each of these matches (once each), before it is sent.
        self.fail_next: list[Match] = []
        #: Lose the answer of the next request each of these matches (once each): it is done.
        self.lose_next: list[Match] = []
        self.requests: list[tuple[str, str]] = []

    async def send(self, request: PipelineRequest) -> PipelineResponse:  # type: ignore[type-arg]
        method, url = request.http_request.method, request.http_request.url
        self.requests.append((method, url))
        for gate in self.gates:
            if not gate.released.is_set() and gate.match(method, url):
                gate.seen += 1
                if gate.seen == gate.nth:
                    gate.reached.set()
                    await gate.released.wait()
        for match in list(self.fail_next):
            if match(method, url):
                self.fail_next.remove(match)
                raise ServiceRequestError("injected: the request was not sent")
        faults = self.faults
        if faults is not None:
            if faults.delay_rate and faults.rng.random() < faults.delay_rate:
                await asyncio.sleep(faults.rng.uniform(0, faults.max_delay))
            if faults.fail_rate and faults.rng.random() < faults.fail_rate:
                faults.injected += 1
                raise ServiceRequestError("injected: the request was not sent")
            lose = bool(faults.lose_rate) and faults.rng.random() < faults.lose_rate
        lost = next((match for match in self.lose_next if match(method, url)), None)
        response = await self.next.send(request)
        if lost is not None:
            self.lose_next.remove(lost)
            raise ServiceRequestError("injected: the answer was lost")
        if faults is not None and lose:
            faults.injected += 1
            raise ServiceRequestError("injected: the answer was lost")
        return response


def failing(rules: list[Match], *, clients: tuple[str, ...],
            lose: bool = False) -> Callable[[int, str], list[StoragePolicy]]:
    """`halves`' policies: the named clients of every worker fail the next request each of
    `rules` matches (once each, whichever client sends it; `lose`: after it was done, its answer
    lost). A policy is one pipeline's link, so each client gets its own, all sharing the rules."""
    def policies(slot: int, client: str) -> list[StoragePolicy]:
        if client not in clients:
            return []
        policy = StoragePolicy()
        if lose:
            policy.lose_next = rules
        else:
            policy.fail_next = rules
        return [policy]

    return policies


def faulty_store(connection_string: str, table_name: str, *, summaries: bool = False,
                 retries: bool = True) -> tuple[TableConversationStore, StoragePolicy]:
    """A Table store on `table_name` whose every storage call passes a `StoragePolicy`."""
    policy = StoragePolicy()
    options = {} if retries else {"retry_total": 0}
    table = TableClient.from_connection_string(connection_string, table_name=table_name,
                                               per_call_policies=[policy], **options)
    return TableConversationStore(table=table, summaries=summaries), policy
