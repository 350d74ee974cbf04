"""`make teams-package`: the Teams app package (appPackage/build/chatstate.zip) for this bot.

Fills the bot's Microsoft App ID (`CLIENT_ID`, from the environment or local.settings.json) into
appPackage/manifest.json, checks the result against the official JSON schema of its manifest
version (from the `@microsoft/app-manifest` npm package, installed by `make deps`: no network) and
the icons' sizes, and zips the manifest and the two icons at the zip's root, as Teams wants them.
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

import jsonschema

from devtools.local_settings import local_environment

ROOT = Path(__file__).resolve().parents[1]
APP_PACKAGE = ROOT / "appPackage"
OUTPUT = APP_PACKAGE / "build" / "chatstate.zip"
SCHEMAS = ROOT / "node_modules" / "@microsoft" / "app-manifest" / "build" / "json-schemas" / "teams"
PLACEHOLDER = "${{CLIENT_ID}}"
ICON_SIZES = {"color": (192, 192), "outline": (32, 32)}
_GUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")


class PackageError(Exception):
    """Why the package cannot be built, in one line."""


def manifest(client_id: str, *, source: Path = APP_PACKAGE / "manifest.json",
             copilot: bool = True) -> dict[str, Any]:
    """The manifest with the app ID filled in; a `PackageError` if the ID is not a GUID.
    `copilot=False`: without the Copilot custom engine agent."""
    if not _GUID.match(client_id):
        raise PackageError(f"CLIENT_ID must be the bot's Microsoft App ID (a GUID), got {client_id!r}")
    filled: dict[str, Any] = json.loads(source.read_text().replace(PLACEHOLDER, client_id))
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


def build(client_id: str, *, output: Path = OUTPUT, copilot: bool = True) -> Path:
    """Write the package; return its path."""
    document = manifest(client_id, copilot=copilot)
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
    client_id = (local_environment() if environ is None else environ).get("CLIENT_ID", "").strip()
    if not client_id:
        print("error: CLIENT_ID is not set: the bot's Microsoft App ID (the environment or "
              "local.settings.json)", file=sys.stderr)
        return 1
    try:
        path = build(client_id, copilot=args.copilot == "on", output=args.output)
    except PackageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    print(f"{shown}: upload it in Teams (Apps > Manage your apps > Upload an app)")
    return 0


if __name__ == "__main__":
    sys.exit(main(argv=sys.argv[1:]))
