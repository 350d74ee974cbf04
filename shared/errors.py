"""The one exception tree of chatstate, and the HTTP status each leaf maps to.

    ChatstateError
    ├── SettingsError              a setting is missing or malformed (start-up)
    ├── BadRequest                 400  the activity or request cannot be used
    │   ├── UnsupportedMediaType   415
    │   └── PayloadTooLarge        413
    ├── Unauthorized               401  the caller's token failed a check (reason code only)
    ├── AuthUnavailable            503  the signing keys could not be fetched (our side, not theirs)
    ├── StoreError                 503  storage failed in a way a retry may fix
    │   ├── StorageUnavailable     503  storage could not be reached
    │   ├── StorageRejected        400  storage refused the data (a retry would fail the same way)
    │   ├── StorageForbidden       500  storage refused our credentials: our setup, not the caller
    │   └── ConversationConflict   409  another turn committed first (stale ETag)
    ├── DuplicateActivity          200  the activity was already committed (carries its turn)
    ├── MessageTooLarge            400  one message is over the stored-size limit; nothing written
    ├── TurnTooLarge               400  a turn is over the transaction limits; nothing written
    ├── InputTooLong               400  the new message alone exceeds the history token budget
    ├── BudgetExhausted            429  a user's or tenant's budget has no room for the next model
    │                                   call (the turn gets the budget reply; never an HTTP answer)
    ├── ModelError                 502  the model call failed for good; the turn is not committed
    │   ├── ModelTimeout           504
    │   ├── ModelUnavailable       502  connection refused, or 429/5xx after the SDK's retries
    │   ├── ModelRejected          502  the model endpoint answered 4xx
    │   │   └── ModelMisconfigured 502  401/403/404: a wrong key, role, model or deployment (setup)
    │   └── ContentFiltered        502  the endpoint's content filter blocked the prompt or reply
    └── ConnectorError             502  the Bot Connector refused or could not be reached

Only `shared.store` and `shared.inbox` (its table and queue) translate Storage's azure exceptions,
and only `shared.model` openai's (and its own azure-identity token errors); `shared.connector`
translates the Bot Framework token's azure-identity errors into `ConnectorError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datetime import datetime

    from .messages import StoredTurn, Usage

__all__ = [
    "AuthUnavailable",
    "BadRequest",
    "BudgetExhausted",
    "ChatstateError",
    "ConnectorError",
    "ContentFiltered",
    "ConversationConflict",
    "DuplicateActivity",
    "InputTooLong",
    "MessageTooLarge",
    "ModelError",
    "ModelMisconfigured",
    "ModelRejected",
    "ModelTimeout",
    "ModelUnavailable",
    "PayloadTooLarge",
    "SettingsError",
    "StorageForbidden",
    "StorageRejected",
    "StorageUnavailable",
    "StoreError",
    "TurnTooLarge",
    "Unauthorized",
    "UnsupportedMediaType",
    "http_status_for",
]


class ChatstateError(Exception):
    """Base of every error chatstate raises on purpose."""

    status = 500
    #: A short machine-readable reason, safe to show to a caller.
    code = "internal_error"


class SettingsError(ChatstateError):
    """A setting is missing or malformed; the message names it."""

    code = "bad_setting"

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"setting {setting}: {problem}")
        self.setting = setting


class BadRequest(ChatstateError):
    status = 400
    code = "bad_request"


class UnsupportedMediaType(BadRequest):
    status = 415
    code = "unsupported_media_type"


class PayloadTooLarge(BadRequest):
    status = 413
    code = "payload_too_large"


class Unauthorized(ChatstateError):
    """A token check failed. `code` is the reason given to the caller; the message is for logs."""

    status = 401

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code


class AuthUnavailable(ChatstateError):
    status = 503
    code = "auth_keys_unavailable"


class StoreError(ChatstateError):
    status = 503
    code = "storage_error"


class StorageUnavailable(StoreError):
    code = "storage_unavailable"


class StorageRejected(StoreError):
    status = 400
    code = "storage_rejected"


class StorageForbidden(StoreError):
    """Storage refused our credentials (401/403): a setting or a role assignment is wrong."""

    status = 500
    code = "storage_misconfigured"


class ConversationConflict(StoreError):
    status = 409
    code = "conversation_conflict"


class DuplicateActivity(ChatstateError):
    """The activity was committed before; `turn` is what was stored for it."""

    status = 200
    code = "duplicate_activity"

    def __init__(self, activity_id: str, turn: StoredTurn | None) -> None:
        super().__init__(f"activity {activity_id!r} was already committed")
        self.activity_id = activity_id
        self.turn = turn


class MessageTooLarge(ChatstateError):
    status = 400
    code = "message_too_large"


class TurnTooLarge(ChatstateError):
    status = 400
    code = "turn_too_large"


class InputTooLong(ChatstateError):
    """The new message alone needs more tokens (`tokens`) than a turn may send (`budget`)."""

    status = 400
    code = "input_too_long"

    def __init__(self, message: str, *, tokens: int, budget: int) -> None:
        super().__init__(message)
        self.tokens = tokens
        self.budget = budget


class BudgetExhausted(ChatstateError):
    """A budget (`level` user or tenant, `limit` daily_tokens or turns_per_minute) has no room for
    the next model call; `reply` says so in the user's terms, `resets_at` is when it starts again.
    Raised before the call: nothing was paid for it."""

    status = 429
    code = "budget_exhausted"

    def __init__(self, *, level: str, limit: str, resets_at: datetime, reply: str) -> None:
        super().__init__(f"the {level} budget ({limit}) has no room for the next model call")
        self.level = level
        self.limit = limit
        self.resets_at = resets_at
        self.reply = reply


class ModelError(ChatstateError):
    """`billed`: what the turn's model calls cost up to the failure (the earlier tool rounds', and
    this call's as reported or estimated), set by the prompt; None when nothing was called."""

    status = 502
    code = "model_error"
    billed: Usage | None = None


class ModelTimeout(ModelError):
    status = 504
    code = "model_timeout"


class ModelUnavailable(ModelError):
    code = "model_unavailable"


class ModelRejected(ModelError):
    code = "model_rejected"


class ModelMisconfigured(ModelRejected):
    """The model endpoint refused us (401, 403) or has no such model or deployment (404): our
    setup is wrong and a retry will fail the same way. The message says what to fix."""

    code = "model_misconfigured"

    def __init__(self, message: str, *, answered: int) -> None:
        super().__init__(message)
        #: The endpoint's HTTP status: 401, 403 or 404.
        self.answered = answered


class ContentFiltered(ModelError):
    code = "content_filtered"


class ConnectorError(ChatstateError):
    """The Bot Connector refused (`answer`: its status and a bounded part of its body) or could not
    be reached (`answer` None)."""

    status = 502
    code = "connector_error"

    def __init__(self, message: str, *, answer: tuple[int, str] | None = None) -> None:
        super().__init__(message)
        self.answer = answer


def http_status_for(error: BaseException) -> int:
    """The HTTP status a caller sees for `error`; anything unplanned is a 500."""
    status: Any = getattr(error, "status", 500) if isinstance(error, ChatstateError) else 500
    return int(status)
