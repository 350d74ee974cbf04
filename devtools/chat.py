"""`make chat`: talk to the running bot from a terminal, and see what Teams would show.

`make chat` runs a small local Teams-like channel: the contract-enforcing Bot Connector stand-in
(devtools/fake_channel.py) on a free loopback port, which the bot replies to as it replies to
Teams (with auth off the bot replies only to loopback service URLs, which this is). Messages go to
the bot as a Teams personal chat's do, so the terminal shows "Thinking…", the answer growing as
it streams, long answers in several messages, citations as numbered sources, suggested replies and
Adaptive Card buttons as numbered choices: type the number to pick one (a card's Action.Execute
goes back as the `adaptiveCard/action` invoke Teams sends). devtools/terminal_view.py draws it.
`make chat INLINE=1` (`--inline`) asks for inline replies instead (expectReplies), as before.

One conversation ID per run; type /reset to clear it, Ctrl-D or Ctrl-C to leave. The bot must run
with auth off (no CLIENT_ID), as `make run` does by default. If the Azurite data folder that
`make run` uses is removed under it, `make chat` says so: the bot's storage can no longer keep
messages, and only a restart of `make run` mends it.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2

from devtools import preflight
from devtools.background import BackgroundLoop
from devtools.fake_channel import FakeConnector
from devtools.local_settings import LOCAL_SETTINGS, LocalSettingsError, local_environment
from devtools.terminal_view import Choice, TerminalView, card_lines
from shared.errors import SettingsError
from shared.settings import load_settings

#: After the last activity, a reply with more parts to come shows its next one within this long.
QUIET_SECONDS = 1.5
#: How long `make chat` waits for a reply before it gives the prompt back.
REPLY_SECONDS = 600.0
#: ...and how long when Azurite's data folder is gone (the turn queue fails silently then).
BROKEN_STORAGE_SECONDS = 10.0
BOT = {"id": "28:chatstate-bot", "name": "bot"}
USER = {"id": "29:terminal-user", "name": "you", "aadObjectId": "00000000-0000-0000-0000-00000000c4a7"}


def send(endpoint: str, conversation_id: str, text: str) -> list[str]:
    """One message with inline replies (expectReplies): the replies' texts (`--inline`)."""
    activity = {
        "type": "message", "id": uuid.uuid4().hex, "text": text, "channelId": "terminal",
        "deliveryMode": "expectReplies", "serviceUrl": "http://127.0.0.1/terminal",
        "conversation": {"id": conversation_id}, "from": {"id": "terminal-user", "name": "you"},
        "recipient": {"id": "chatstate-bot", "name": "bot"},
    }
    request = urllib.request.Request(endpoint, data=json.dumps(activity).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        body = json.loads(response.read() or b"{}")
    return [str(a.get("text", "")) for a in body.get("activities", []) if a.get("type") == "message"]


class TerminalChannel:
    """The Teams-like channel: what goes to the bot, and the stand-in its replies come to."""

    def __init__(self, *, endpoint: str, conversation_id: str, view: TerminalView,
                 connector: FakeConnector, http: httpx2.Client) -> None:
        self.endpoint = endpoint
        self.conversation_id = conversation_id
        self.view = view
        self.connector = connector
        self.http = http

    @classmethod
    @contextmanager
    def running(cls, *, endpoint: str, conversation_id: str,
                view: TerminalView) -> Iterator[TerminalChannel]:
        loop = BackgroundLoop()
        connector = FakeConnector()
        connector.on_activity = view.heard
        loop.run(connector.start())
        http = httpx2.Client(timeout=120)
        try:
            yield cls(endpoint=endpoint, conversation_id=conversation_id, view=view,
                      connector=connector, http=http)
        finally:
            http.close()
            loop.run(connector.stop())
            loop.close()

    def _activity(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "id": uuid.uuid4().hex, "channelId": "msteams",
                "serviceUrl": self.connector.url, "locale": "en-US", "from": USER, "recipient": BOT,
                "conversation": {"id": self.conversation_id, "conversationType": "personal"},
                **fields}

    def post(self, activity: dict[str, Any]) -> httpx2.Response:
        return self.http.post(self.endpoint, json=activity)

    def welcome(self) -> bool:
        """The user and the bot join the chat (Teams then shows the bot's welcome, if any)."""
        return self._taken(self.post(self._activity("conversationUpdate",
                                                    membersAdded=[USER, BOT])))

    def say(self, text: str, *, value: Any = None, reply_to: str | None = None) -> bool:
        """Send a message; False (and why, shown) when the bot did not take it."""
        fields: dict[str, Any] = {"text": text}
        if value is not None:
            fields["value"] = value
        if reply_to:
            fields["replyToId"] = reply_to
        self.view.user_spoke()
        return self._taken(self.post(self._activity("message", **fields)))

    def pick(self, choice: Choice) -> bool:
        """Answer a suggested reply or a card's button as Teams would."""
        if choice.kind == "imBack":
            return self.say(str(choice.value))
        if choice.kind == "Action.Submit":
            return self.say("", value=choice.value, reply_to=choice.reply_to)
        if choice.kind == "Action.OpenUrl":
            self.view.said(f"(open {choice.value} in a browser)")
            return False
        self.view.user_spoke()
        action = {"type": "Action.Execute", "verb": choice.verb, "data": choice.value}
        if choice.action_id:
            action["id"] = choice.action_id
        response = self.post(self._activity("invoke", name="adaptiveCard/action",
                                            value={"action": action, "trigger": "manual"},
                                            replyToId=choice.reply_to))
        if not self._taken(response):
            return False
        self._show_invoke_answer(response)
        return True

    def _taken(self, response: httpx2.Response) -> bool:
        if response.status_code < 300:
            return True
        try:
            reason = response.json().get("reason") or response.text
        except ValueError:
            reason = response.text
        self.view.said(f"! the bot answered {response.status_code}: {reason}")
        return False

    def _show_invoke_answer(self, response: httpx2.Response) -> None:
        """What Teams does with an invoke's answer: a card replaces the one clicked, a message
        is shown."""
        try:
            body = response.json() if response.content else {}
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        if body.get("type") == "application/vnd.microsoft.card.adaptive":
            lines, _ = card_lines(body.get("value"))
            self.view.said("bot> (card) " + " / ".join(lines))
        elif body.get("type") == "application/vnd.microsoft.activity.message":
            self.view.said(f"bot> {body.get('value')}")
        elif int(body.get("statusCode") or 200) >= 400:
            self.view.said(f"! the card's action was refused: {body.get('value')}")

    def turn(self, text: str, *, seconds: float = REPLY_SECONDS) -> None:
        """The user's line: a choice's number picks it, anything else is a message; then the
        reply, whole (waited for `seconds` at most), and any rule of Teams' it broke."""
        view = self.view
        messages, finished = view.messages, view.finished
        broken = len(self.connector.streams.violations)
        choices = list(view.choices)
        sent = time.monotonic()
        choice = choices[int(text) - 1] if text.isdigit() and 1 <= int(text) <= len(choices) \
            else None
        if choice is not None:
            taken = _reach(self, functools.partial(self.pick, choice))
        else:
            taken = _reach(self, functools.partial(self.say, text))
        # A card's invoke is answered in its response: wait on only if the bot goes on talking.
        invoked = choice is not None and choice.kind == "Action.Execute"
        waiting = taken and (not invoked or self._heard_since(sent, within=QUIET_SECONDS))
        if waiting and not self.wait_for_reply(since_messages=messages, since_finished=finished,
                                               seconds=seconds):
            view.said("(no reply yet; it will show here when it comes)")
        for violation in self.connector.streams.violations[broken:]:
            view.said(f"! Teams would refuse what the bot sent: {violation}")

    def _heard_since(self, moment: float, *, within: float) -> bool:
        deadline = moment + within
        while time.monotonic() < deadline:
            if self.view.last_heard > moment:
                return True
            time.sleep(0.05)
        return self.view.last_heard > moment

    def wait_for_reply(self, *, since_messages: int, since_finished: int,
                       seconds: float = REPLY_SECONDS) -> bool:
        """Until the reply looks whole: its last message came (or a message came, no stream is
        live and nothing more for `QUIET_SECONDS`). False when nothing came in `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            view = self.view
            if view.finished > since_finished:
                return True
            if view.messages > since_messages and time.monotonic() - view.last_heard > QUIET_SECONDS \
                    and not any(self.connector.streams.live(s)
                                for s in self.connector.streams.of(self.conversation_id)):
                return True
            time.sleep(0.05)
        return False


def storage_gone(running: preflight.Running | None) -> bool:
    """Whether the Azurite data folder `make run` started its storage in has been removed."""
    return running is not None and running.azurite_data is not None and \
        not running.azurite_data.exists()


def _truth(data: Path) -> str:
    return (f"! Azurite's data folder {data} was removed while `make run` runs: the bot's local "
            "storage can no longer keep what you send (queued messages fail, nothing reaches the "
            "disk). Stop `make run` (Ctrl-C) and start it again.")


def _orphaned_bot(port: int, path: Path) -> str | None:
    """The truth when a bot answers on `port` but the run file (in Azurite's data folder) is gone
    with the folder: `make run` is running on a removed data folder."""
    folder = path.parent
    if folder.exists():
        return None
    try:
        httpx2.get(f"http://127.0.0.1:{port}/api/health", timeout=2)
    except httpx2.HTTPError:
        return None
    return _truth(folder)


def chat_inline(endpoint: str, conversation_id: str) -> int:
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not text:
            continue
        try:
            replies = send(endpoint, conversation_id, text)
        except urllib.error.HTTPError as exc:
            print(f"! the bot answered {exc.code}: {exc.read().decode(errors='replace')}",
                  file=sys.stderr)
            continue
        except OSError as exc:
            print(f"! cannot reach {endpoint} ({exc}); is make run running? (it notes its port "
                  "for make chat)", file=sys.stderr)
            continue
        for reply in replies:
            print(f"bot> {reply}")


def chat(endpoint: str, conversation_id: str, *, welcome: bool,
         running: preflight.Running | None) -> int:
    view = TerminalView(sys.stdout, tty=sys.stdout.isatty())
    with TerminalChannel.running(endpoint=endpoint, conversation_id=conversation_id,
                                 view=view) as channel:
        print(f"the bot replies to a local Teams-like channel on {channel.connector.url}: it "
              "streams, and shows sources, suggested replies and cards (make chat INLINE=1: "
              "inline replies)")
        if welcome:
            _reach(channel, channel.welcome)
        warned = False
        while True:
            try:
                view.at_prompt = True
                text = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            finally:
                view.at_prompt = False
            if not text:
                continue
            broken = storage_gone(running)
            if broken and not warned:
                assert running is not None and running.azurite_data is not None
                view.said(_truth(running.azurite_data))
                warned = True
            # With its storage gone the bot may take a message it will never answer.
            channel.turn(text, seconds=BROKEN_STORAGE_SECONDS if broken else REPLY_SECONDS)


def _reach(channel: TerminalChannel, act: Callable[[], bool]) -> bool:
    try:
        return act()
    except httpx2.HTTPError as exc:
        channel.view.said(f"! cannot reach {channel.endpoint} ({type(exc).__name__}); is make run "
                          "running? (it notes its port for make chat)")
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chat with the local bot.")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--conversation", default=None, help="a conversation ID to continue")
    parser.add_argument("--inline", action="store_true",
                        help="inline replies (expectReplies) instead of the Teams-like channel")
    parser.add_argument("--settings", type=Path, default=LOCAL_SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--run-file", type=Path, default=preflight.RUN_FILE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        configured = load_settings(local_environment(args.settings)).port
    except (LocalSettingsError, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    port, found = preflight.bot_port(given=args.port, configured=configured, path=args.run_file)
    running = preflight.read_run_file(path=args.run_file)
    endpoint = f"http://127.0.0.1:{port}/api/messages"
    if running is None and (truth := _orphaned_bot(port, args.run_file)) is not None:
        print(truth, file=sys.stderr)
        found = "PORT"
    prefix = "terminal:" if args.inline else "a:terminal-"
    conversation_id = args.conversation or f"{prefix}{uuid.uuid4().hex[:12]}"
    print(f"chatting with {endpoint} (port from {found}) as conversation {conversation_id}\n"
          "type a message, or the number of a choice; /reset clears the conversation; Ctrl-D "
          "leaves")
    if args.inline:
        return chat_inline(endpoint, conversation_id)
    return chat(endpoint, conversation_id, welcome=args.conversation is None, running=running)


if __name__ == "__main__":
    raise SystemExit(main())
