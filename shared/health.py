"""What /api/health says: whether storage and the model answer us, checked at once, no tokens spent.

`healthy`: both answer. `degraded`: one of them refuses us or cannot be reached, and `failing`
names which. The HTTP status (`function_app.py`, argued in docs/operate.md) follows what the bot
can still do: with the model down it still accepts every message and answers it with an apology
or a setup-problem reply (200); with storage down it can accept nothing (503).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ChatstateError, StorageForbidden

if TYPE_CHECKING:
    from .model import ChatModel, ModelCheck
    from .store import ConversationStore

__all__ = ["Health", "check_health"]

log = logging.getLogger(__name__)

#: Seconds a health check waits for storage before it calls it unreachable.
STORAGE_TIMEOUT_SECONDS = 5.0
REACHABLE = "reachable"
REFUSED = "refused: check the key / role"
UNREACHABLE = "unreachable"


@dataclass(frozen=True, kw_only=True)
class Health:
    storage: str
    model: ModelCheck

    @property
    def failing(self) -> tuple[str, ...]:
        """What refuses us or cannot be reached: "storage", "model", both or neither."""
        from .model import ModelState

        return tuple(name for name, bad in (("storage", self.storage != REACHABLE),
                                            ("model", self.model.state is not ModelState.OK))
                     if bad)

    @property
    def status(self) -> str:
        return "degraded" if self.failing else "healthy"


async def check_health(store: ConversationStore, model: ChatModel) -> Health:
    """Storage pinged and the model's state (checked again unless known good or a setup
    problem), both at once."""
    storage, check = await asyncio.gather(_storage(store), model.known_state())
    return Health(storage=storage, model=check)


async def _storage(store: ConversationStore) -> str:
    try:
        async with asyncio.timeout(STORAGE_TIMEOUT_SECONDS):
            await store.ping()
    except StorageForbidden as exc:
        log.warning("health check: storage refused our credentials: %s", exc)
        return REFUSED
    except (ChatstateError, TimeoutError) as exc:
        log.warning("health check: storage unreachable: %s", exc or "no answer in time")
        return UNREACHABLE
    return REACHABLE
