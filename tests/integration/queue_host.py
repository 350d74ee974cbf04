"""The Functions host's queue trigger, as far as the answer function's tests need it.

It polls a real (Azurite) queue, hides a message it took for `lease` seconds, passes the body and
the dequeue count to the handler, deletes the message when the handler returns, and when it
raises makes it visible again after `retry_delay` seconds (host.json's visibilityTimeout) or, on the
`max_dequeue_count`th dequeue, moves it to `<queue>-poison`. The dev host's own queue trigger
(devtools, issue 19's host half) does the same for the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from azure.storage.queue import BinaryBase64DecodePolicy, QueueMessage, TextBase64EncodePolicy
from azure.storage.queue.aio import QueueClient

Handler = Callable[[bytes, int], Awaitable[None]]


def queue_client(connection_string: str, name: str) -> QueueClient:
    return QueueClient.from_connection_string(connection_string, name,
                                              message_encode_policy=TextBase64EncodePolicy(),
                                              message_decode_policy=BinaryBase64DecodePolicy())


class QueueHost:
    def __init__(self, *, connection_string: str, queue_name: str, handler: Handler,
                 max_dequeue_count: int = 5, lease: int = 600, retry_delay: int = 0,
                 poll: float = 0.05) -> None:
        self.queue = queue_client(connection_string, queue_name)
        self.poison = queue_client(connection_string, f"{queue_name}-poison")
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
                if visible_only:
                    waiting = bool(await self.queue.peek_messages(max_messages=1))
                else:
                    waiting = bool((await self.queue.get_queue_properties()).approximate_message_count)
                if not self._running and not waiting:
                    return
                await asyncio.sleep(self.poll)

    async def _loop(self) -> None:
        while True:
            took = False
            async for message in self.queue.receive_messages(visibility_timeout=self.lease,
                                                             max_messages=8):
                took = True
                task = asyncio.create_task(self._handle(message))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            if not took:
                await asyncio.sleep(self.poll)

    async def _handle(self, message: QueueMessage) -> None:
        content = bytes(message.content)
        dequeue_count = int(message.dequeue_count or 1)
        try:
            await self.handler(content, dequeue_count)
        except Exception:  # the host's job: retry, then poison
            self.failures += 1
            if dequeue_count >= self.max_dequeue_count:
                await self.poison.send_message(content.decode())
                await self.queue.delete_message(message)
            else:
                await self.queue.update_message(message.id, pop_receipt=message.pop_receipt,
                                                content=content.decode(),
                                                visibility_timeout=self.retry_delay)
            return
        self.handled += 1
        await self.queue.delete_message(message)
