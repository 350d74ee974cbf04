"""Budgets across conversations: a user's and a tenant's tokens a day and a user's turns a minute,
reserved before each model call, settled after it; and the usage they record, by day.

    the turn's `TurnSpend` (the prompt's `SpendHook`):
      before each model call   reserve its worst case (prompt + the reply's maximum) in the ledger
                               of every account with a limit, the user's then the tenant's (one
                               conditional write each); the first call also takes the turn's
                               place (turns a minute). No room in one: what the others took is
                               given back, `BudgetExhausted`
      after it                 settle what it cost (what the provider reported, else the estimate)
      at the turn's end        record the turn in the ledgers no limit reserved in (usage only)

The promise: a ledger is changed only with a write conditioned on the ETag it was read at, and a
reservation is taken only when `settled + open reservations + this one <= limit`. So however many
turns run on however many instances, the settled tokens pass a limit only when a call costs more
than it reserved (a prompt the estimate undercounted), or a reservation expired before its call
ended: `CHAT_BUDGET_RESERVATION_SECONDS` must outlast `CHAT_MODEL_TIMEOUT_SECONDS`, which bounds a
turn's calls. Either way by at most one call's reservation per such call.

The conversation's own limits (`shared/limits.py`) stay in its head. Usage reports (`report`) read
an account's ledgers; an estimated cost comes from CHAT_MODEL_PRICES.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from . import telemetry
from .activity import Activity
from .errors import BudgetExhausted, StoreError
from .ledger import Account, Ledger, Level, Reservation, Shortfall
from .messages import Usage, utc_day
from .settings import BudgetSettings, ModelPrice, Settings
from .store import ConversationStore

__all__ = ["BUDGET_REPLIES", "MAX_REPORT_DAYS", "Budgets", "DayUsage", "TurnSpend", "UsageReport",
           "budget_reply", "estimated_cost"]

log = logging.getLogger(__name__)

#: A usage report covers at most this many days.
MAX_REPORT_DAYS = 366


@dataclass(frozen=True, slots=True)
class _Budget:
    """One account's limits for a turn: `daily` tokens (reserved per call), `per_minute` turns."""

    account: Account
    daily: int | None = None
    per_minute: int | None = None

    @property
    def reserves(self) -> bool:
        return self.daily is not None

    @property
    def admits(self) -> bool:
        return self.daily is not None or self.per_minute is not None


class Budgets:
    """The budgets of the settings on one store (`budgets` capability); per turn, `for_turn`."""

    def __init__(self, *, settings: BudgetSettings, store: ConversationStore,
                 max_reply_tokens: int, clock: Callable[[], datetime] | None = None) -> None:
        """`max_reply_tokens`: the reply's maximum a call reserves (the chat model's);
        `clock`: None, the store's."""
        self.settings = settings
        self.store = store
        self.max_reply_tokens = max_reply_tokens
        self.clock = clock or store.clock

    @classmethod
    def build(cls, settings: Settings, store: ConversationStore,
              clock: Callable[[], datetime] | None = None) -> Budgets | None:
        """The budgets for `settings`, or None on a store that keeps no ledgers."""
        if not store.supports("budgets"):
            return None
        return cls(settings=settings.budgets, store=store,
                   max_reply_tokens=settings.model.max_reply_tokens, clock=clock)

    def for_turn(self, activity: Activity, *, max_reply_tokens: int | None = None) -> TurnSpend:
        """The hook one turn's model calls go through (`max_reply_tokens`: the calls' reply cap,
        when it is not the chat model's: the summary model's)."""
        limits = self.settings
        sender = activity.user
        user = sender.aad_id or sender.id
        budgets = []
        if user:
            budgets.append(_Budget(Account("user", user), daily=limits.user_daily_tokens,
                                   per_minute=limits.user_turns_per_minute))
        if activity.tenant_id:
            budgets.append(_Budget(Account("tenant", activity.tenant_id),
                                   daily=limits.tenant_daily_tokens))
        return TurnSpend(self, tuple(budgets),
                         turn=Ledger.turn_id(activity.id) if activity.id else "",
                         tenant=activity.tenant_id, time_zone=activity.time_zone,
                         max_reply_tokens=max_reply_tokens or self.max_reply_tokens)

    async def report(self, account: Account, *, days: int) -> UsageReport:
        """The account's usage of today and the `days` - 1 days before, oldest first."""
        now = self.clock()
        first = utc_day(now - timedelta(days=days - 1))
        found = {ledger.day: ledger for ledger in await self.store.list_ledgers(account,
                                                                                 since=first)}
        limits = self.settings
        return UsageReport(
            account=account,
            days=tuple(self.day_usage(found.get(day) or Ledger(account=account, day=day), now=now)
                       for day in _days(now, days)),
            daily_limit=limits.user_daily_tokens if account.level == "user"
            else limits.tenant_daily_tokens,
            turns_per_minute=limits.user_turns_per_minute if account.level == "user" else None)

    async def level_usage(self, level: Level, *, days: int) -> list[DayUsage]:
        """Every account's usage of `level` over today and the `days` - 1 days before."""
        now = self.clock()
        ledgers = await self.store.list_level_ledgers(
            level, since=utc_day(now - timedelta(days=days - 1)), until=utc_day(now))
        return [self.day_usage(ledger, now=now) for ledger in ledgers]

    def day_usage(self, ledger: Ledger, *, now: datetime) -> DayUsage:
        return DayUsage(account=ledger.account, day=ledger.day, tokens=ledger.tokens,
                        input_tokens=ledger.input_tokens, cached_tokens=ledger.cached_tokens,
                        output_tokens=ledger.output_tokens, calls=ledger.calls,
                        turns=ledger.turns, reserved=ledger.reserved(now.timestamp()),
                        estimated_cost=estimated_cost(ledger, self.settings.prices))

    async def forget_user(self, user_ids: Sequence[str]) -> int:
        """Delete a user's usage (their ID and daily counts), under each of their IDs (a ledger
        is kept under the Entra object ID when the channel gives one); the days deleted."""
        deleted = 0
        for user_id in dict.fromkeys(user_ids):
            deleted += await self.store.delete_ledgers(Account("user", user_id))
        return deleted

    async def purge(self, *, days: int) -> int:
        """Delete the ledgers older than `days` days (the retention period)."""
        return await self.store.purge_ledgers(
            before=utc_day(self.clock() - timedelta(days=days)))


@dataclass(frozen=True, kw_only=True)
class DayUsage:
    account: Account
    day: str
    tokens: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    calls: int
    turns: int
    #: Tokens held now by reservations of calls still running.
    reserved: int
    #: From CHAT_MODEL_PRICES; None when a model used that day has no price.
    estimated_cost: float | None


@dataclass(frozen=True, kw_only=True)
class UsageReport:
    account: Account
    #: Every day of the report, oldest first (days without use count zeros).
    days: tuple[DayUsage, ...]
    daily_limit: int | None
    turns_per_minute: int | None


def estimated_cost(ledger: Ledger, prices: Sequence[ModelPrice]) -> float | None:
    """The day's cost by its models' prices (the longest matching prefix); None if one is unpriced."""
    cost = 0.0
    for used in ledger.models:
        price = max((p for p in prices if used.model.startswith(p.model)),
                    key=lambda p: len(p.model), default=None)
        if price is None:
            return None
        fresh = max(0, used.input_tokens - used.cached_tokens)
        cost += (fresh * price.input + used.cached_tokens * price.cached_input
                 + used.output_tokens * price.output) / 1_000_000
    return round(cost, 6)


def _days(now: datetime, days: int) -> list[str]:
    return [utc_day(now - timedelta(days=back)) for back in range(days - 1, -1, -1)]


class TurnSpend:
    """One turn's budgets, told of each model call (the prompt's `SpendHook`); `finish` once the
    turn ends. Not shared between turns."""

    def __init__(self, budgets: Budgets, accounts: tuple[_Budget, ...], *, turn: str,
                 tenant: str | None, time_zone: str | None, max_reply_tokens: int) -> None:
        self._budgets = budgets
        self._accounts = accounts
        #: The turn's name in the ledgers' minutes (`Ledger.turn_id`): a retry counts once.
        self._turn = turn
        self._tenant = tenant
        self._time_zone = time_zone
        self._max_reply = max_reply_tokens
        self._admitted: set[Account] = set()
        #: Where this attempt counted the turn (not an earlier attempt of it).
        self._counted_here: set[Account] = set()
        #: The open reservation: where it is held (account, day) and which it is.
        self._open: tuple[tuple[Account, ...], str, Reservation] | None = None
        #: Calls not yet recorded in the ledgers that reserve nothing: (model, usage).
        self._unrecorded: list[tuple[str, Usage]] = []
        #: Settles under way (the turn goes on meanwhile; `finish` waits for them).
        self._settling: list[asyncio.Task[None]] = []
        self._turn_recorded = False

    @property
    def accounts(self) -> tuple[Account, ...]:
        """Whose budgets the turn's calls count in: the user's, then the tenant's (either may be
        missing: a channel that names no user or no tenant)."""
        return tuple(budget.account for budget in self._accounts)

    async def before_call(self, prompt_tokens: Callable[[], int]) -> None:
        """Reserve the call's worst case in every ledger with a daily limit (and, the first time,
        take the turn's place); `BudgetExhausted` if one has no room, with nothing kept.

        One ledger after the other, the user's before the tenant's: a turn the user's budget
        refuses never holds the tenant's room, even for a moment (at once, six turns of one user
        with room for one could all be refused by the tenant's, full of their brief holds)."""
        now = self._budgets.clock()
        limited = [b for b in self._accounts
                   if b.reserves or (b.admits and b.account not in self._admitted)]
        if not limited:
            return
        day, at = utc_day(now), now.timestamp()
        reservation = Reservation(uuid.uuid4().hex[:12], prompt_tokens() + self._max_reply,
                                  math.ceil(at + self._budgets.settings.reservation_seconds))
        taken: list[_Budget] = []
        for budget in limited:
            try:
                shortfall = await self._take(budget, day, at, reservation)
            except StoreError:
                await self._give_back(taken, day, at, reservation)
                raise
            if shortfall is not None:
                await self._give_back(taken, day, at, reservation)
                raise self._exhausted(budget, shortfall, now, reservation.tokens)
            taken.append(budget)
        self._admitted.update(b.account for b in limited)
        self._open = (tuple(b.account for b in limited if b.reserves), day, reservation)

    async def after_call(self, usage: Usage, *, model: str) -> None:
        """Settle what the call cost where it reserved (in the background: the turn goes on, and
        a next call's reservation waits for it in the same write), keep it for `finish`
        elsewhere. Never raises: a settle that fails leaves its reservation to expire."""
        held, day, reservation = self._open or ((), "", None)
        self._open = None
        if any(not b.reserves for b in self._accounts):
            self._unrecorded.append((model, usage))
        if reservation is None or not held:
            return
        self._settling.append(asyncio.create_task(self._write_all(
            held, day, lambda ledger: ledger.settle(usage, model=model,
                                                    reservation_id=reservation.id),
            "a call's usage not settled")))
        self._measure(held, usage)

    async def finish(self) -> None:
        """Wait for the settles under way, and record in the ledgers no limit reserved in the
        calls not recorded yet (and the turn, unless its place was taken). Never raises; called
        again, it records only what is new (the turn runs it beside its commit, then once more
        whatever ended it)."""
        settling, self._settling = self._settling, []
        await asyncio.gather(*settling)
        unreserved = [b for b in self._accounts if not b.reserves]
        unrecorded, self._unrecorded = self._unrecorded, []
        if not unrecorded or not unreserved:
            return
        total = sum((usage for _, usage in unrecorded), Usage())
        model = unrecorded[-1][0]
        calls = len(unrecorded)
        counted, self._turn_recorded = self._turn_recorded, True
        day, at = utc_day(self._budgets.clock()), self._budgets.clock().timestamp()

        def record(admitted: bool) -> Callable[[Ledger], Ledger]:
            def change(ledger: Ledger) -> Ledger:
                spent = ledger.settle(total, model=model, calls=calls)
                if admitted:
                    return spent
                counted = spent.admit(at, turn=self._turn, turns_per_minute=None)
                assert isinstance(counted, Ledger)
                return counted
            return change

        await asyncio.gather(*(self._write(b.account, day,
                                           record(counted or b.account in self._admitted),
                                           "a turn's usage not recorded") for b in unreserved))
        self._measure(tuple(b.account for b in unreserved), total)

    # -- the ledger writes ---------------------------------------------------------------------

    async def _take(self, budget: _Budget, day: str, at: float,
                    reservation: Reservation) -> Shortfall | None:
        """Take the turn's place (first call) and the reservation in one ledger; the shortfall
        if it has no room (nothing written then)."""
        shortfall: Shortfall | None = None
        admit = budget.account not in self._admitted

        def change(ledger: Ledger) -> Ledger | None:
            nonlocal shortfall
            shortfall = None
            if admit:
                admitted = ledger.admit(at, turn=self._turn, turns_per_minute=budget.per_minute)
                if isinstance(admitted, Shortfall):
                    shortfall = admitted
                    return None
                if admitted is not ledger:
                    self._counted_here.add(budget.account)
                ledger = admitted
            if budget.reserves:
                reserved = ledger.reserve(reservation, limit=budget.daily, now=at)
                if isinstance(reserved, Shortfall):
                    shortfall = reserved
                    return None
                ledger = reserved
            return ledger

        await self._budgets.store.update_ledger(budget.account, day, change)
        return shortfall

    async def _give_back(self, taken: list[_Budget], day: str, at: float,
                         reservation: Reservation) -> None:
        """Undo what `_take` did in the ledgers that had room, when another had none."""
        def undo(budget: _Budget) -> Callable[[Ledger], Ledger]:
            admitted = budget.account not in self._admitted and \
                budget.account in self._counted_here
            return lambda ledger: (ledger.unadmit(at, turn=self._turn) if admitted
                                   else ledger).release(reservation.id)

        await asyncio.gather(*(self._write(b.account, day, undo(b), "a reservation not given "
                                           "back (it expires)") for b in taken))

    async def _write_all(self, accounts: Sequence[Account], day: str,
                         change: Callable[[Ledger], Ledger], failure: str) -> None:
        await asyncio.gather(*(self._write(account, day, change, failure) for account in accounts))

    async def _write(self, account: Account, day: str, change: Callable[[Ledger], Ledger],
                     failure: str) -> None:
        try:
            await self._budgets.store.update_ledger(account, day, change)
        except StoreError as exc:
            log.warning("%s in the %s budget: %s", failure, account.level, exc)

    def _measure(self, accounts: Sequence[Account], usage: Usage) -> None:
        for account in accounts:
            telemetry.budget_tokens(usage.prompt_tokens, usage.completion_tokens,
                                    level=account.level, tenant=self._tenant)

    # -- the refusal ---------------------------------------------------------------------------

    def _exhausted(self, budget: _Budget, shortfall: Shortfall, now: datetime,
                   tokens: int) -> BudgetExhausted:
        level = budget.account.level
        if shortfall.limit == "turns_per_minute":
            resets = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
        else:
            resets = datetime.combine(now.astimezone(UTC).date() + timedelta(days=1),
                                      datetime.min.time(), tzinfo=UTC)
        limit = budget.daily if shortfall.limit == "daily_tokens" else budget.per_minute
        if shortfall.limit == "daily_tokens" and limit is not None and tokens > limit:
            log.error("the %s daily token limit (%d) is below one model call's worst case (%d "
                      "tokens: the prompt and the reply's maximum): nothing can be answered",
                      level, limit, tokens)
        log.warning("spend_limit_reached limit=%s_%s call_reserves=%d; no model call", level,
                    shortfall.limit, tokens)
        telemetry.spend_limit_reached(f"{level}_{shortfall.limit}", tenant=self._tenant)
        return BudgetExhausted(level=level, limit=shortfall.limit, resets_at=resets,
                               reply=budget_reply(level, shortfall.limit, now=now, resets=resets,
                                                  time_zone=self._time_zone))


#: The budget replies (the bot's words, not the model's); never another user's figures.
BUDGET_REPLIES: dict[tuple[str, str], str] = {
    ("user", "daily_tokens"): "You've reached your daily usage limit for me, so I can't answer "
                              "that right now. It resets {when}.",
    ("tenant", "daily_tokens"): "Your organization has reached today's usage limit for me, so I "
                                "can't answer that right now. It resets {when}.",
    ("user", "turns_per_minute"): "You're sending messages faster than I can answer across your "
                                  "chats. Please wait {wait} and send that one again.",
}


def budget_reply(level: str, limit: str, *, now: datetime, resets: datetime,
                 time_zone: str | None) -> str:
    """What the user reads: which budget ran out and when it starts again, in their terms (their
    time zone when the channel gives it, else UTC)."""
    template = BUDGET_REPLIES[(level, limit)]
    wait = _duration(resets - now)
    zone = _zone(time_zone)
    local = resets.astimezone(zone or UTC)
    at = f"{local:%H:%M}" + (" your time" if zone else " UTC")
    return template.format(when=f"in {wait}, at {at}", wait=wait)


def _zone(name: str | None) -> ZoneInfo | None:
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def _duration(delta: timedelta) -> str:
    seconds = max(1, math.ceil(delta.total_seconds()))
    if seconds < 60:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if minutes else f"{hours} hour{'s' if hours != 1 else ''}"

