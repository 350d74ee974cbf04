"""The Functions host's queue trigger, as far as the answer function's tests need it.

It polls a real (Azurite) queue, hides a message it took for `lease` seconds and renews that lease
at half-time while the handler runs, passes the body and the dequeue count to the handler, deletes
the message when the handler returns, and when it raises makes it visible again after
`retry_delay` seconds (host.json's visibilityTimeout) or, on the `max_dequeue_count`th dequeue,
moves it to `<queue>-poison` (a message dequeued more often than that, its runs died with their
worker, goes there without a run). A storage failure while polling or settling a message is
logged and lived with, as the host does: polling goes on, and a message not settled comes back
when its lease runs out. The dev host's own queue trigger (devtools/queues.py) does the same for
the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from azure.core.exceptions import AzureError
from azure.storage.queue import BinaryBase64DecodePolicy, QueueMessage, TextBase64EncodePolicy
from azure.storage.queue.aio import QueueClient

Handler = Callable[[bytes, int], Awaitable[None]]

log = logging.getLogger(__name__)


def queue_client(connection_string: str, name: str, *, policies: Sequence[Any] = ()) -> QueueClient:
    """`policies`: azure-core policies each call passes (the torture records and fails calls
    with them). The queue SDK has no per-call slot: they run after its retry policy, which is
    then off, so an injected failure reaches the code as one failed call (the SDK's own retry
    would wait 12-18 s first)."""
    options: dict[str, Any] = {"_additional_pipeline_policies": list(policies),
                               "retry_total": 0} if policies else {}
    return QueueClient.from_connection_string(connection_string, name,
                                              message_encode_policy=TextBase64EncodePolicy(),
                                              message_decode_policy=BinaryBase64DecodePolicy(),
                                              **options)


class QueueHost:
    def __init__(self, *, connection_string: str, queue_name: str, handler: Handler,
                 max_dequeue_count: int = 5, lease: int = 600, retry_delay: int = 0,
                 poll: float = 0.05, policies: Sequence[Any] = ()) -> None:
        self.queue = queue_client(connection_string, queue_name, policies=policies)
        self.poison = queue_client(connection_string, f"{queue_name}-poison", policies=policies)
        self.handler = handler
        self.max_dequeue_count = max_dequeue_count
        self.lease = lease
        self.retry_delay = retry_delay
        self.poll = poll
        self.handled = 0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> QueueHost:
        for client in (self.queue, self.poison):
            with contextlib.suppress(Exception):  # it exists already
                await client.create_queue()
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._running, return_exceptions=True)
        await self.queue.close()
        await self.poison.close()

    async def kill(self) -> None:
        """The worker dies: it takes no more messages, and what it was handling stops where it
        is (those messages stay hidden for the lease; a hold it had stays until it expires)."""
        if self._task is not None:
            self._task.cancel()
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, *([self._task] if self._task else []),
                             return_exceptions=True)
        self._running.clear()

    async def poisoned(self) -> list[bytes]:
        return [bytes(m.content) async for m in self.poison.receive_messages(
            visibility_timeout=1, max_messages=32)]

    @property
    def busy(self) -> bool:
        """A message is being handled now."""
        return bool(self._running)

    async def idle(self, *, within: float = 30.0, visible_only: bool = False) -> None:
        """Wait until the queue is empty and nothing is being handled. `visible_only`: messages
        queued for later (invisible) do not count."""
        async with asyncio.timeout(within):
            while True:
                try:
                    if visible_only:
                        waiting = bool(await self.queue.peek_messages(max_messages=1))
                    else:
                        waiting = bool((await self.queue.get_queue_properties())
                                       .approximate_message_count)
                except AzureError:
                    waiting = True  # not known: look again
                if not self._running and not waiting:
                    return
                await asyncio.sleep(self.poll)

    async def _loop(self) -> None:
        while True:
            took = False
            try:
                async for message in self.queue.receive_messages(visibility_timeout=self.lease,
                                                                 max_messages=8):
                    took = True
                    task = asyncio.create_task(self._handle(message))
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
            except AzureError as exc:  # the host backs off and polls again
                log.info("polling failed (%s); polling again", type(exc).__name__)
            if not took:
                await asyncio.sleep(self.poll)

    async def _handle(self, message: QueueMessage) -> None:
        content = bytes(message.content)
        dequeue_count = int(message.dequeue_count or 1)
        receipt = [str(message.pop_receipt)]
        try:
            if dequeue_count > self.max_dequeue_count:  # its runs died: no more runs
                await self._to_poison(message, content, receipt)
                return
            renewing = asyncio.create_task(self._renew(message, receipt))
            try:
                await self.handler(content, dequeue_count)
            except Exception:  # the host's job: retry, then poison
                self.failures += 1
                await _stopped(renewing)
                if dequeue_count >= self.max_dequeue_count:
                    await self._to_poison(message, content, receipt)
                else:
                    await self.queue.update_message(message.id, pop_receipt=receipt[0],
                                                    content=content.decode(),
                                                    visibility_timeout=self.retry_delay)
                return
            finally:  # (killed: the lease is no longer renewed, and runs out)
                await _stopped(renewing)
            self.handled += 1
            await self.queue.delete_message(message.id, receipt[0])
        except AzureError as exc:  # not settled: it comes back when its lease runs out
            log.info("a queue message was not settled (%s)", type(exc).__name__)

    async def _to_poison(self, message: QueueMessage, content: bytes, receipt: list[str]) -> None:
        await self.poison.send_message(content.decode())
        await self.queue.delete_message(message.id, receipt[0])

    async def _renew(self, message: QueueMessage, receipt: list[str]) -> None:
        """Keep the message hidden while its handler runs (the host renews at half the lease)."""
        while True:
            await asyncio.sleep(self.lease / 2)
            try:
                updated = await self.queue.update_message(message.id, pop_receipt=receipt[0],
                                                          visibility_timeout=self.lease)
            except AzureError:
                continue  # tried again at the next half-lease
            receipt[0] = str(updated.pop_receipt)


async def _stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
