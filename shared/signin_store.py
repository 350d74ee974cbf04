"""What signing users in must remember across instances: who was asked to sign in, and which
single sign-on exchange was claimed. Never a token.

One table beside the conversations table (its name + `signin`), two kinds of rows:

    PartitionKey                 RowKey                                   holds
    u<user>                      <connection>|<conversation>              a sign-in asked for: the
                                                                          channel, until when
    x<conversation>              <exchange id>                            a claimed SSO exchange:
                                                                          exchanging, signed-in or
                                                                          failed

(keys made with `shared.keys.encode_key`, which never writes `|`). A claim is one conditional
create: Teams sends one `signin/tokenExchange` per open client, all with the same exchange ID, to
any instance; the one whose create wins exchanges, the others read its outcome. Rows are small and
short-lived: `purge_before` (the retention timer) and `forget_user` (a user's removal) delete them.
Storage errors are translated by the store's typed client (`TableRows`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Self

from azure.core.exceptions import ResourceExistsError
from azure.data.tables import UpdateMode
from azure.data.tables.aio import TableClient

from .errors import StorageRejected
from .keys import encode_key
from .messages import utc_now
from .store._table_base import TableRows, sdk_options, transport

__all__ = ["ExchangeOutcome", "PendingSignIn", "SignInStore", "signin_table_name"]

#: An exchange's state: claimed and under way, or how it ended.
ExchangeOutcome = Literal["exchanging", "signed-in", "failed"]


def signin_table_name(table_name: str) -> str:
    """The sign-in table beside the conversations table (at most 63 characters)."""
    return f"{table_name[:57]}signin"


@dataclass(frozen=True, kw_only=True)
class PendingSignIn:
    """A sign-in the bot asked a user for: in which conversation (where the turn waits) and on
    which channel, for which connection, until when."""

    user_id: str
    channel_id: str
    connection: str
    conversation_id: str
    expires_at: datetime
    #: The parked turn waiting for this sign-in (its `Pending.id`); empty: none waits.
    parked_id: str = ""


class SignInStore:
    def __init__(self, table: TableClient) -> None:
        self._rows = TableRows(table)

    @classmethod
    def from_connection_string(cls, connection_string: str, *, table_name: str,
                               env_proxy: bool = False) -> Self:
        return cls(TableClient.from_connection_string(
            connection_string, table_name=signin_table_name(table_name),
            transport=transport(env_proxy=env_proxy), **sdk_options()))

    @classmethod
    def from_endpoint(cls, endpoint: str, *, table_name: str, credential: Any,
                      env_proxy: bool = False) -> Self:
        return cls(TableClient(endpoint=endpoint, table_name=signin_table_name(table_name),
                               credential=credential, transport=transport(env_proxy=env_proxy),
                               **sdk_options()))

    async def close(self) -> None:
        await self._rows.close()

    # -- single sign-on exchanges ------------------------------------------------------------

    async def claim_exchange(self, *, conversation_id: str, exchange_id: str,
                             user_id: str) -> bool:
        """Claim the exchange `exchange_id`: True for the one caller that may run it."""
        entity = {"PartitionKey": _exchange_partition(conversation_id),
                  "RowKey": encode_key(exchange_id), "user": user_id, "outcome": "exchanging"}
        try:
            await self._rows.run("claiming a sign-in exchange", self._rows.table.create_entity,
                                 entity)
        except StorageRejected as exc:
            if isinstance(exc.__cause__, ResourceExistsError):
                return False
            raise
        return True

    async def settle_exchange(self, *, conversation_id: str, exchange_id: str,
                              outcome: ExchangeOutcome) -> None:
        """Record how the claimed exchange ended."""
        entity = {"PartitionKey": _exchange_partition(conversation_id),
                  "RowKey": encode_key(exchange_id), "outcome": outcome}
        await self._rows.run("recording a sign-in exchange", self._rows.table.update_entity,
                             entity, mode=UpdateMode.MERGE)

    async def exchange_outcome(self, *, conversation_id: str,
                               exchange_id: str) -> ExchangeOutcome | None:
        """How the exchange went (None: never claimed)."""
        row = await self._rows.run("reading a sign-in exchange", self._rows.get,
                                   _exchange_partition(conversation_id), encode_key(exchange_id))
        if row is None:
            return None
        outcome = row.get("outcome")
        return outcome if outcome in ("exchanging", "signed-in", "failed") else "failed"

    # -- sign-ins asked for -------------------------------------------------------------------

    async def note_pending(self, pending: PendingSignIn) -> None:
        """Remember that `pending.user_id` was asked to sign in (a card was sent)."""
        entity = {"PartitionKey": _user_partition(pending.user_id),
                  "RowKey": _pending_row(pending.connection, pending.conversation_id),
                  "user": pending.user_id, "channel": pending.channel_id,
                  "connection": pending.connection, "conversation": pending.conversation_id,
                  "expires": pending.expires_at.astimezone(UTC), "parked": pending.parked_id}
        await self._rows.run("noting a sign-in asked for", self._rows.table.upsert_entity,
                             entity, mode=UpdateMode.REPLACE)

    async def pending(self, *, user_id: str, channel_id: str,
                      now: datetime | None = None) -> list[PendingSignIn]:
        """The unexpired sign-ins `user_id` was asked for on `channel_id`, oldest first."""
        now = now or utc_now()
        found = [pending async for pending in self._pending_rows(user_id)
                 if pending.channel_id == channel_id and pending.expires_at > now]
        return sorted(found, key=lambda pending: pending.expires_at)

    async def clear_pending(self, *, user_id: str, connection: str | None = None) -> int:
        """Forget the sign-ins asked of `user_id` for `connection` (None: all); how many went."""
        removed = 0
        async for pending in self._pending_rows(user_id):
            if connection in (None, pending.connection):
                await self._rows.run("forgetting a sign-in asked for",
                                     self._rows.table.delete_entity, _user_partition(user_id),
                                     _pending_row(pending.connection, pending.conversation_id))
                removed += 1
        return removed

    async def _pending_rows(self, user_id: str) -> AsyncIterator[PendingSignIn]:
        rows = await self._rows.run("reading sign-ins asked for", self._query,
                                    "PartitionKey eq @pk", {"pk": _user_partition(user_id)})
        for row in rows:
            yield PendingSignIn(user_id=str(row["user"]), channel_id=str(row["channel"]),
                                connection=str(row["connection"]),
                                conversation_id=str(row["conversation"]),
                                expires_at=row["expires"], parked_id=str(row.get("parked") or ""))

    # -- removal ----------------------------------------------------------------------------

    async def forget_user(self, user_id: str) -> int:
        """Delete every row that names `user_id`; how many went."""
        removed = await self.clear_pending(user_id=user_id)
        rows = await self._rows.run("finding a user's sign-in exchanges", self._query,
                                    "user eq @user", {"user": user_id})
        for row in rows:
            await self._rows.run("deleting a sign-in exchange", self._rows.table.delete_entity,
                                 row["PartitionKey"], row["RowKey"])
            removed += 1
        return removed

    async def purge_before(self, cutoff: datetime) -> int:
        """Delete rows written before `cutoff` (leftovers); how many went."""
        rows = await self._rows.run("finding old sign-in rows", self._query,
                                    "Timestamp lt @cutoff", {"cutoff": cutoff.astimezone(UTC)})
        for row in rows:
            await self._rows.run("purging an old sign-in row", self._rows.table.delete_entity,
                                 row["PartitionKey"], row["RowKey"])
        return len(rows)

    async def _query(self, query: str, parameters: dict[str, Any]) -> list[dict[str, Any]]:
        return [dict(row) async for row in self._rows.table.query_entities(query,
                                                                           parameters=parameters)]


def _exchange_partition(conversation_id: str) -> str:
    return "x" + encode_key(conversation_id)


def _user_partition(user_id: str) -> str:
    return "u" + encode_key(user_id)


def _pending_row(connection: str, conversation_id: str) -> str:
    return f"{encode_key(connection)}|{encode_key(conversation_id)}"
