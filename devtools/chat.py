"""`make chat`: talk to the running bot from a terminal, as a channel would (expectReplies).

One conversation ID per run; type /reset to clear it, Ctrl-D or Ctrl-C to leave. The bot must run
with auth off (no CLIENT_ID), as `make run` does by default.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from devtools import preflight
from devtools.local_settings import LOCAL_SETTINGS, LocalSettingsError, local_environment
from shared.errors import SettingsError
from shared.settings import load_settings


def send(endpoint: str, conversation_id: str, text: str) -> list[str]:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chat with the local bot.")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--conversation", default=None, help="a conversation ID to continue")
    parser.add_argument("--settings", type=Path, default=LOCAL_SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--run-file", type=Path, default=preflight.RUN_FILE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        configured = load_settings(local_environment(args.settings)).port
    except (LocalSettingsError, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    port, found = preflight.bot_port(given=args.port, configured=configured, path=args.run_file)
    endpoint = f"http://127.0.0.1:{port}/api/messages"
    conversation_id = args.conversation or f"terminal:{uuid.uuid4().hex[:12]}"
    print(f"chatting with {endpoint} (port from {found}) as conversation {conversation_id}\n"
          "type a message; /reset clears the conversation; Ctrl-D leaves")
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
            print(f"! the bot answered {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
            continue
        except OSError as exc:
            print(f"! cannot reach {endpoint} ({exc}); is make run running? (it notes its port "
                  "for make chat)", file=sys.stderr)
            continue
        for reply in replies:
            print(f"bot> {reply}")


if __name__ == "__main__":
    raise SystemExit(main())
