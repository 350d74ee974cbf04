"""`make teams-package`: the Teams app package (appPackage/build/chatstate.zip) for this bot.

Fills the bot's Microsoft App ID (`CLIENT_ID`, from the environment or local.settings.json) into
appPackage/manifest.json, and, when users sign in (`CHAT_SIGNIN_APP_ID`, the app registration of
the bot's OAuth connection), Teams single sign-on's `webApplicationInfo` (that app and its
`api://botid-<app ID>` URI) and the token service's host (`CHAT_TOKEN_SERVICE_URL`) in
`validDomains`, where the sign-in button's page opens; without it both are left out. It checks
the result against the official JSON schema of its manifest version (from the
`@microsoft/app-manifest` npm package, installed by `make deps`: no network) and the icons'
sizes, and zips the manifest and the two icons at the zip's root, as Teams wants them.
Upload the zip in Teams: Apps → Manage your apps → Upload an app → Upload a custom app.

The bot is also declared a Microsoft 365 Copilot custom engine agent (`copilotAgents`, manifest
1.20 on; the `copilot` scope), so it shows among the agents in Copilot Chat: it streams, and keeps
a silent stream alive, as Copilot asks. `make teams-package COPILOT=off` leaves that out (a tenant
where custom engine agents, in preview, are not allowed).
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema

from devtools.local_settings import local_environment
from shared.settings import TOKEN_SERVICE_URL

ROOT = Path(__file__).resolve().parents[1]
APP_PACKAGE = ROOT / "appPackage"
OUTPUT = APP_PACKAGE / "build" / "chatstate.zip"
SCHEMAS = ROOT / "node_modules" / "@microsoft" / "app-manifest" / "build" / "json-schemas" / "teams"
PLACEHOLDER = "${{CLIENT_ID}}"
SIGNIN_PLACEHOLDER = "${{SIGNIN_APP_ID}}"
TOKEN_HOST_PLACEHOLDER = "${{TOKEN_SERVICE_HOST}}"
ICON_SIZES = {"color": (192, 192), "outline": (32, 32)}
_GUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")


class PackageError(Exception):
    """Why the package cannot be built, in one line."""


def manifest(client_id: str, *, signin_app_id: str | None = None,
             token_service_url: str = TOKEN_SERVICE_URL,
             source: Path = APP_PACKAGE / "manifest.json", copilot: bool = True) -> dict[str, Any]:
    """The manifest with the app IDs filled in; a `PackageError` if one is not a GUID. Without
    `signin_app_id` (no one signs in), no `webApplicationInfo` and no `validDomains`.
    `copilot=False`: without the Copilot custom engine agent."""
    if not _GUID.match(client_id):
        raise PackageError(f"CLIENT_ID must be the bot's Microsoft App ID (a GUID), got {client_id!r}")
    if signin_app_id is not None and not _GUID.match(signin_app_id):
        raise PackageError(f"CHAT_SIGNIN_APP_ID must be the sign-in app registration's client ID "
                           f"(a GUID), got {signin_app_id!r}")
    text = source.read_text().replace(PLACEHOLDER, client_id)
    text = text.replace(SIGNIN_PLACEHOLDER, signin_app_id or "")
    text = text.replace(TOKEN_HOST_PLACEHOLDER, urlparse(token_service_url).hostname or "")
    filled: dict[str, Any] = json.loads(text)
    if signin_app_id is None:
        del filled["webApplicationInfo"]
        filled["validDomains"] = []
    if not copilot:
        filled.pop("copilotAgents", None)
        for bot in filled.get("bots", []):
            bot["scopes"] = [scope for scope in bot.get("scopes", []) if scope != "copilot"]
    return filled


def validate(document: dict[str, Any]) -> None:
    """Check `document` against the official schema of its `manifestVersion`."""
    version = document.get("manifestVersion")
    path = SCHEMAS / f"v{version}" / "MicrosoftTeams.schema.json"
    if not path.exists():
        raise PackageError(f"no schema for manifestVersion {version!r} at "
                           f"{path.relative_to(ROOT)} (run make deps)")
    schema = json.loads(path.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(document), key=lambda error: list(error.absolute_path))
    if errors:
        where = "/".join(str(part) for part in errors[0].absolute_path) or "(top)"
        raise PackageError(f"manifest.json does not match the v{version} schema at {where}: "
                           f"{errors[0].message}")


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG (from its IHDR chunk)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise PackageError("an icon is not a PNG")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def build(client_id: str, *, signin_app_id: str | None = None,
          token_service_url: str = TOKEN_SERVICE_URL, output: Path = OUTPUT,
          copilot: bool = True) -> Path:
    """Write the package; return its path."""
    document = manifest(client_id, signin_app_id=signin_app_id,
                        token_service_url=token_service_url, copilot=copilot)
    validate(document)
    icons: dict[str, bytes] = {}
    for kind, size in ICON_SIZES.items():
        name = str(document["icons"][kind])
        icons[name] = (APP_PACKAGE / name).read_bytes()
        if png_size(icons[name]) != size:
            raise PackageError(f"{name} must be {size[0]}x{size[1]} pixels, is "
                               f"{'x'.join(map(str, png_size(icons[name])))}")
    output.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(output, "w", compression=zipfile.ZIP_DEFLATED) as package:
        package.writestr("manifest.json", json.dumps(document, indent=2, ensure_ascii=False))
        for name, data in icons.items():
            package.writestr(name, data)
    return output


def main(environ: dict[str, str] | None = None, argv: list[str] | None = None) -> int:
    """Build the package; 1 with one line on stderr saying why not. `environ`: a test seam."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copilot", choices=["on", "off"], default="on",
                        help="declare the bot a Microsoft 365 Copilot custom engine agent")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=argparse.SUPPRESS)
    args = parser.parse_args([] if argv is None else argv)
    environ = local_environment() if environ is None else environ
    client_id = environ.get("CLIENT_ID", "").strip()
    if not client_id:
        print("error: CLIENT_ID is not set: the bot's Microsoft App ID (the environment or "
              "local.settings.json)", file=sys.stderr)
        return 1
    try:
        path = build(client_id, signin_app_id=environ.get("CHAT_SIGNIN_APP_ID", "").strip() or None,
                     token_service_url=environ.get("CHAT_TOKEN_SERVICE_URL", "").strip() or
                     TOKEN_SERVICE_URL, copilot=args.copilot == "on", output=args.output)
    except PackageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    print(f"{shown}: upload it in Teams (Apps > Manage your apps > Upload an app)")
    return 0


if __name__ == "__main__":
    sys.exit(main(argv=sys.argv[1:]))
