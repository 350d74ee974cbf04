"""The Table backend's rolling summaries: what the next summary folds, and its conditional write."""

from __future__ import annotations

from ..keys import encode_key
from ._codec import (
    HEAD,
    Entity,
    message_row_key,
)
from ._fold import FoldJob, fold_job
from ._head import Head
from ._table_base import TableRows

__all__ = ["Summaries"]

#: A summary that fell behind is prepared from at most this many of the oldest rows at a time.
_FOLD_ROWS = 500


class Summaries:
    """The rolling summary's reads and writes, on the head and the message rows (`enabled`
    False: the conversations keep no summary, and nothing is folded)."""

    def __init__(self, rows: TableRows, *, enabled: bool) -> None:
        self._rows = rows
        self.enabled = enabled

    async def get_summary(self, conversation_id: str) -> str | None:
        entity = await self._rows.run("reading the summary", self._rows.get, encode_key(conversation_id), HEAD)
        return None if entity is None else Head.read(entity, etag="").summary

    async def get_fold(self, conversation_id: str, *, token_budget: int,
                       max_messages: int | None = None) -> FoldJob | None:
        if not self.enabled:
            return None
        pk = encode_key(conversation_id)
        entity = await self._rows.run("reading the conversation for a summary", self._rows.get, pk, HEAD)
        if entity is None:
            return None
        head = Head.read(entity, etag=str(entity.metadata["etag"]))
        start = head.window_start
        if head.ready_step() is not None or start > head.last_seq:
            return None  # prepared already, or nothing after the start
        if head.copy is not None and head.copy_from <= start:
            rows = [row for row in head.copy if row["seq"] >= start]
            return fold_job(head, rows, token_budget=token_budget, reach_newest=True,
                            max_messages=max_messages)
        # The copy does not reach back to the start (the summary fell behind): read the oldest
        # rows from the start, at most _FOLD_ROWS of them.
        last = min(head.last_seq, start + _FOLD_ROWS - 1)
        rows = await self._rows.run("reading messages for a summary", self._read_range, pk, start, last)
        return fold_job(head, rows, token_budget=token_budget, reach_newest=last == head.last_seq,
                        max_messages=max_messages)

    async def _read_range(self, pk: str, first: int, last: int) -> list[Entity]:
        rows = [dict(row) async for row in self._rows.table.query_entities(
            "PartitionKey eq @pk and RowKey ge @newest and RowKey le @oldest",
            parameters={"pk": pk, "newest": message_row_key(last), "oldest": message_row_key(first)})]
        return sorted(rows, key=lambda row: int(row["seq"]))

    async def update_summary(self, job: FoldJob, summary: str) -> bool:
        def pending(head: Head) -> Head | None:
            """The head with the summary pending, if the job still holds for it."""
            if head.epoch != job.head.epoch or head.window_start != job.start \
                    or head.ready_step() is not None or head.cleared_seq != job.head.cleared_seq:
                return None
            return head.with_pending(summary, start=job.start, to=job.to)

        written = await self._rows.run("storing a summary", self._rows.update_head,
                                  encode_key(job.conversation_id), pending,
                                  conversation_id=job.conversation_id)
        return written is not None
