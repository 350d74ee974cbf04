"""A long chat with the rolling summary: prompt-prefix reuse, summary calls, cached tokens, memory.

200 turns of about 250 tokens (a ~60-token question, a ~190-token answer) at the default budget
(8,000 tokens of history, 1,000 of summary), in-process: the real `ChatPrompt`, `Summarizer` and
`TableConversationStore` on Azurite, the model behind the real openai SDK over HTTP
(`FakeModelServer`, whose usage reports `cached_tokens` as a prefix cache: the longest prefix
shared with an earlier prompt, from 1,024 tokens in blocks of 128). Each turn is what the webhook
does: load, send, commit, and after the reply the summary work. Turn 0 gives a fact ("my locker
code is 4417"); the stand-in summarizer keeps sentences that ask to be remembered (a real model
is asked to keep every fact; what it keeps is not measured here). The same chat runs with
summaries off (today's sliding window) for comparison.

Then storage per turn with summaries on, as the `store` benchmark measures it (window 8 messages /
4,000 tokens, conversations of 10 and 5,000 messages seeded as before, then turned over to the
summary store), the summary work after a turn (fold read + conditional head write, with a
stand-in text) counted in the turn that triggers it.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from devtools.fake_model import FakeModelServer, _common_prefix, default_reply, prompt_text
from shared.model import build_model
from shared.prompt import ChatPrompt, ConversationMemory
from shared.settings import load_settings
from shared.store import TableConversationStore
from shared.summary import SUMMARY_INSTRUCTIONS, Summarizer

from . import store as store_bench
from .common import azurite_version, code_version, machine, median, now_iso

TURNS = 200
BUDGET = 8_000
SUMMARY_BUDGET = 1_000
FACT = "Please remember this: my locker code is 4417."
PREFIX_TARGET = 0.8
RATIO_TARGET = 1.2

_QUESTION = ("What should we look at next in the quarterly planning review, given the numbers from "
             "the last sprint and the feedback from the support team about onboarding? ")
_ANSWER = ("Start with onboarding: support saw most tickets in the first week, so a shorter setup "
           "guide and a checklist in the product would cut them. Then revisit the sprint figures: "
           "velocity held, but carry-over grew, which points at estimates rather than capacity. ")


def _reply(body: dict[str, Any]) -> str:
    messages = body.get("messages", [])
    if messages and str(messages[0]["content"]).startswith(SUMMARY_INSTRUCTIONS[:40]):
        previous, _, transcript = str(messages[-1]["content"]).partition("\n\nNew messages:\n")
        kept = [s for s in previous.removeprefix("Summary so far:\n").split("\n") if "4417" in s]
        kept += [line.split("] ", 1)[-1] for line in transcript.splitlines()
                 if "remember" in line.lower() and not line.startswith("assistant")]
        topics = "Topics so far: quarterly planning, sprint numbers, onboarding feedback."
        return "\n".join(dict.fromkeys([*kept, topics]))
    return f"{default_reply(body)[:40]} {_ANSWER * 2}"


async def _chat(connection_string: str, server: FakeModelServer, *, summaries: bool) -> dict[str, Any]:
    settings = load_settings({"OPENAI_BASE_URL": server.base_url, "OPENAI_MODEL": "bench",
                              "CHAT_MODEL_MAX_RETRIES": "0"})
    model = build_model(settings.model)
    store = TableConversationStore.from_connection_string(
        connection_string, table_name="l" + uuid.uuid4().hex[:16], summaries=summaries)
    prompt = ChatPrompt(model, instructions=settings.model.instructions)
    summarizer = Summarizer(store=store, model=model, token_budget=SUMMARY_BUDGET,
                            history_token_budget=BUDGET)
    first_request = len(server.requests)
    shares: list[float] = []
    previous: str | None = None
    chat_usage: list[dict[str, Any]] = []
    summary_calls = 0
    last_request = ""
    try:
        for index in range(TURNS):
            text = f"[{index}] " + (FACT if index == 0 else _QUESTION)
            memory = ConversationMemory(store, "long", token_budget=BUDGET)
            await memory.load(input=text, activity_id=f"a{index}")
            result = await prompt.send(text, memory=memory)
            sent = prompt_text(server.requests[-1])
            chat_usage.append(server.usages[-1])
            if previous is not None:
                shares.append(_common_prefix(previous, sent) / len(sent))
            previous, last_request = sent, sent
            await memory.commit(result, activity_id=f"a{index}")
            before = len(server.requests)
            assert memory.window is not None
            await summarizer.after_turn(memory.window)
            summary_calls += len(server.requests) - before
    finally:
        await store.close()
        await model.close()
    assert len(server.requests) - first_request == TURNS + summary_calls
    prompt_tokens = sum(u["prompt_tokens"] for u in chat_usage)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in chat_usage)
    return {
        "prefix_share_mean": round(sum(shares) / len(shares), 3),
        "prefix_share_median": round(median(shares), 3),
        "summary_calls_per_100_turns": round(summary_calls * 100 / TURNS, 1),
        "cached_token_share": round(cached / prompt_tokens, 3),
        "prompt_tokens_per_turn": round(prompt_tokens / TURNS),
        "fact_from_turn_0_in_turn_199_request": "4417" in last_request,
    }


async def _storage(connection_string: str) -> dict[str, Any]:
    """Per-turn storage cost with summaries on, at 10 and 5,000 stored messages (window 8)."""
    table = "s" + uuid.uuid4().hex[:16]
    seeder = store_bench.Ours(connection_string, table)
    ours = TableConversationStore.from_connection_string(connection_string, table_name=table,
                                                         summaries=True)
    small = [f"small-{i}" for i in range(45)]
    try:
        for conversation in small:
            await seeder.seed(conversation, 10)
        await seeder.seed("large", 5_000)
        samples: dict[int, list[float]] = {10: [], 5_000: []}
        for index in range(45):
            for size, conversation in ((10, small[index]), (5_000, "large")):
                elapsed = await _store_turn(ours, conversation, index)
                if index >= 5:
                    samples[size].append(elapsed)
    finally:
        await seeder.close()
        await ours.close()
    medians = {size: round(median(values), 2) for size, values in samples.items()}
    return {"turn_ms_median": medians, "ratio_5000_10": round(medians[5_000] / medians[10], 2),
            "ratio_target": RATIO_TARGET}


async def _store_turn(store: TableConversationStore, conversation: str, index: int) -> float:
    started = time.perf_counter()
    window = await store.load_window(conversation, token_budget=store_bench.TOKEN_BUDGET,
                                     max_messages=store_bench.MAX_MESSAGES,
                                     activity_id=f"turn-{index}")
    await store.commit_turn(window, activity_id=f"turn-{index}",
                            messages=store_bench.exchange(index))
    if window.summary_due:
        job = await store.get_fold(conversation, token_budget=store_bench.TOKEN_BUDGET)
        if job is not None:
            await store.update_summary(job, "A stand-in summary of the earlier turns. " * 10)
    return (time.perf_counter() - started) * 1000


async def run(connection_string: str) -> dict[str, Any]:
    logging.getLogger("shared").setLevel(logging.ERROR)
    started = time.perf_counter()
    async with FakeModelServer(reply=_reply) as server:
        with_summary = await _chat(connection_string, server, summaries=True)
        server.cache = type(server.cache)()  # a cold cache for the comparison
        without = await _chat(connection_string, server, summaries=False)
    storage = await _storage(connection_string)
    section = {
        "turns": TURNS, "history_token_budget": BUDGET, "summary_token_budget": SUMMARY_BUDGET,
        "summary_on": with_summary, "summary_off": without, "storage": storage,
        "prefix_target": PREFIX_TARGET,
        "storage_engine": azurite_version(), "machine": machine(), "code": code_version(),
        "measured_at": now_iso(), "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"long chat, {TURNS} turns of ~250 tokens, budget {BUDGET:,} (summary {SUMMARY_BUDGET:,})")
    print(f"{'':42} {'summary on':>12} {'off (today)':>12}")
    for key in ("prefix_share_mean", "prefix_share_median", "summary_calls_per_100_turns",
                "cached_token_share", "prompt_tokens_per_turn",
                "fact_from_turn_0_in_turn_199_request"):
        print(f"{key:42} {with_summary[key]!s:>12} {without[key]!s:>12}")
    print(f"storage per turn (window 8), median ms at 10 / 5,000: "
          f"{storage['turn_ms_median'][10]} / {storage['turn_ms_median'][5_000]}, "
          f"ratio {storage['ratio_5000_10']} (target <= {RATIO_TARGET})")
    return section
