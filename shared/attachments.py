"""Files and images people send the bot: fetched within bounds, read for the model, described for
the store.

What a message may bring (`attachments` of the activity):

- an image (`image/*` with a `contentUrl`: a picture pasted or attached in Teams, which lives on
  the Bot Connector's host and needs the bot's token; or a `data:` URL);
- a file (Teams' `application/vnd.microsoft.teams.file.download.info`, whose `content.downloadUrl`
  is a pre-authorized link, on SharePoint for Teams);
- Teams' HTML copy of the message text (`text/html` without a URL) and cards, which are ignored.

The rules: at most `max_files` of them, each at most `max_bytes` (the announced length is checked
first, then the bytes as they arrive); downloads go only to a host on `BOT_SERVICE_URL_HOSTS` or
`CHAT_FILE_HOSTS` (https; plain http only for a listed loopback host), redirects included, and
the bot's token only to the former. Images (PNG, JPEG, GIF, WebP, known by their bytes) go to
the model as image input when it takes images (`CHAT_MODEL_IMAGES`); text files (plain, Markdown,
CSV, JSON and the like, UTF-8) go into the message's text, cut to fit half the token budget.
Anything else is refused with a polite reply (`Refusal`), before any model call. What is stored
is the message's text (the files' text included, each image as a placeholder such as
`[image: photo.png, 120 KB]`, which is what later turns see) and each attachment's name, type
and size: never an image's bytes.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes, urljoin

import aiohttp

from .activity import Activity
from .auth import service_url_allowed
from .messages import Attachment
from .settings import Settings
from .tokens import count_text_tokens, image_size, image_tokens

__all__ = ["AttachmentReader", "ImageInput", "Incoming", "Refusal", "has_attachments"]

log = logging.getLogger(__name__)

TEAMS_FILE = "application/vnd.microsoft.teams.file.download.info"
#: Image formats the OpenAI image input takes, by their first bytes.
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
                (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))
_IMAGE_EXTENSIONS = {"png", "jpg", "jpeg", "gif", "webp"}
_TEXT_EXTENSIONS = {"txt", "text", "md", "markdown", "csv", "tsv", "json", "jsonl", "xml", "yaml",
                    "yml", "log", "ini", "toml", "cfg", "conf", "html", "htm", "rst", "tex", "sql",
                    "py", "js", "ts", "java", "cs", "go", "rs", "c", "h", "cpp", "sh", "ps1", "rb",
                    "php", "kt", "swift", "css", "vtt", "srt"}
_TEXT_TYPES = {"application/json", "application/xml", "application/x-yaml", "application/yaml",
               "application/x-ndjson", "application/csv"}
_MAX_REDIRECTS = 3
_DOWNLOAD_SECONDS = 20.0

UNSUPPORTED = ("Sorry, I can read images (PNG, JPEG, GIF, WebP) and text files (plain text, "
               "Markdown, CSV, JSON and the like), but not {name}.")
TOO_BIG = "Sorry, {name} is too large for me: I can take files of up to {limit}."
TOO_MANY = "Sorry, I can take at most {limit} files in one message, and this one has {count}."
NO_IMAGES = "Sorry, the model I use cannot look at images, so I cannot answer about {name}."
NOT_FETCHED = "Sorry, I could not fetch {name}. Could you send it again?"
NOT_ALLOWED = "Sorry, I may not fetch {name} from where it is stored."


@dataclass(frozen=True, kw_only=True)
class ImageInput:
    """An image for this turn's request only (never stored)."""

    name: str
    media_type: str
    data: bytes

    def part(self) -> dict[str, Any]:
        """The Chat Completions content part: the image as a data URL."""
        encoded = base64.b64encode(self.data).decode("ascii")
        return {"type": "image_url", "image_url": {"url": f"data:{self.media_type};base64,{encoded}"}}


@dataclass(frozen=True, kw_only=True)
class Incoming:
    """A message with what came with it: `text` as the model reads it and the store keeps it
    (files' text and image placeholders included), the images, and what to store of each."""

    text: str
    images: tuple[ImageInput, ...] = ()
    stored: tuple[Attachment, ...] = ()

    @property
    def image_tokens(self) -> int:
        """The images' tokens as the model's context counts them (`shared/tokens.py`)."""
        return sum(image_tokens(*image_size(image.data), billed=False) for image in self.images)

    def wire(self, message: dict[str, Any]) -> dict[str, Any]:
        """The user message's wire form with the images added as content parts."""
        if not self.images:
            return message
        parts = [{"type": "text", "text": str(message.get("content") or "")}]
        return {**message, "content": parts + [image.part() for image in self.images]}


@dataclass(frozen=True, kw_only=True)
class Refusal:
    """Why the message cannot be answered: `reply` for the user, `reason` for the log."""

    reply: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class _Item:
    name: str
    content_type: str
    url: str
    extension: str = ""


class _Refused(Exception):
    def __init__(self, reply: str, reason: str) -> None:
        super().__init__(reason)
        self.refusal = Refusal(reply=reply, reason=reason)


def has_attachments(activity: Activity) -> bool:
    """Whether the activity brings a file or an image to read (or to refuse)."""
    return bool(_items(activity))


@dataclass(kw_only=True)
class AttachmentReader:
    """Reads a message's attachments by the settings' rules. `token`: the bot's token for the
    Bot Connector's hosts (None when the bot has no identity)."""

    settings: Settings
    token: Callable[[], Awaitable[str | None]]

    async def read(self, activity: Activity, text: str, *, token_budget: int) -> Incoming | Refusal:
        """The message with its attachments read, or a `Refusal` saying what cannot be taken."""
        items = _items(activity)
        if not items:
            return Incoming(text=text)
        limits = self.settings.attachments
        if len(items) > limits.max_files:
            return Refusal(reply=TOO_MANY.format(limit=limits.max_files, count=len(items)),
                           reason=f"{len(items)} attachments; the limit is {limits.max_files}")
        try:
            async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=_DOWNLOAD_SECONDS),
                    trust_env=self.settings.env_proxy,
                    cookie_jar=aiohttp.DummyCookieJar()) as session:
                loaded = [await self._load(session, item) for item in items]
        except _Refused as refused:
            return refused.refusal
        return _compose(text, loaded, token_budget=token_budget)

    async def _load(self, session: aiohttp.ClientSession,
                    item: _Item) -> tuple[_Item, str, bytes]:
        """(item, media type, bytes): an image or a text file, else `_Refused`."""
        kind = _kind(item)
        if kind is None:
            raise _Refused(UNSUPPORTED.format(name=_quoted(item.name)),
                           f"unsupported attachment type {item.content_type[:100]!r}")
        if kind == "image" and not self.settings.attachments.model_images:
            raise _Refused(NO_IMAGES.format(name=_quoted(item.name)),
                           "an image, and CHAT_MODEL_IMAGES is off")
        data = await self._fetch(session, item)
        if kind == "image":
            media_type = _image_type(data)
            if media_type is None:
                raise _Refused(UNSUPPORTED.format(name=_quoted(item.name)),
                               "an image in a format the model does not take")
            return item, media_type, data
        return item, "text/plain", data

    async def _fetch(self, session: aiohttp.ClientSession, item: _Item) -> bytes:
        if item.url.startswith("data:"):
            decoded = _data_url(item.url)
            if decoded is None:
                raise _Refused(NOT_FETCHED.format(name=_quoted(item.name)), "a malformed data URL")
            self._check_size(item, len(decoded))
            return decoded
        url = item.url
        for _ in range(_MAX_REDIRECTS + 1):
            headers = await self._headers_for(item, url)
            try:
                async with session.get(url, headers=headers, allow_redirects=False) as response:
                    if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                        url = urljoin(url, response.headers["Location"])
                        continue
                    if response.status != 200:
                        raise _Refused(NOT_FETCHED.format(name=_quoted(item.name)),
                                       f"the download answered {response.status}")
                    if response.content_length is not None:
                        self._check_size(item, response.content_length)
                    data = bytearray()
                    async for chunk in response.content.iter_chunked(65_536):
                        data += chunk
                        self._check_size(item, len(data))
                    return bytes(data)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise _Refused(NOT_FETCHED.format(name=_quoted(item.name)),
                               f"the download failed: {type(exc).__name__}") from exc
        raise _Refused(NOT_FETCHED.format(name=_quoted(item.name)), "too many redirects")

    async def _headers_for(self, item: _Item, url: str) -> dict[str, str]:
        """The request's headers, if its host may be asked at all: the bot's token only for
        the Bot Connector's hosts."""
        bot_hosts = self.settings.bot.service_url_hosts
        if service_url_allowed(url, bot_hosts):
            token = await self.token()
            return {"Authorization": f"Bearer {token}"} if token else {}
        if service_url_allowed(url, self.settings.attachments.file_hosts):
            return {}
        log.warning("refused to download an attachment from an unlisted host")
        raise _Refused(NOT_ALLOWED.format(name=_quoted(item.name)),
                       "the download's host is not on BOT_SERVICE_URL_HOSTS or CHAT_FILE_HOSTS")

    def _check_size(self, item: _Item, size: int) -> None:
        limit = self.settings.attachments.max_bytes
        if size > limit:
            raise _Refused(TOO_BIG.format(name=_quoted(item.name), limit=_size(limit)),
                           f"an attachment over {limit:,} bytes")


def _items(activity: Activity) -> list[_Item]:
    """The attachments to read: images and Teams files (and others with a URL, to refuse)."""
    raw = activity.raw.get("attachments")
    items: list[_Item] = []
    for entry in raw if isinstance(raw, list) else []:
        if not isinstance(entry, dict):
            continue
        content_type = str(entry.get("contentType") or "").strip().lower()
        name = entry["name"] if isinstance(entry.get("name"), str) else ""
        content = entry.get("content")
        if content_type == TEAMS_FILE and isinstance(content, dict):
            url, extension = content.get("downloadUrl"), content.get("fileType")
            if isinstance(url, str) and url:
                items.append(_Item(name=name or "a file", content_type=content_type, url=url,
                                   extension=str(extension or _extension(name)).lower()))
            continue
        url = entry.get("contentUrl")
        if not isinstance(url, str) or not url or content_type.startswith(
                "application/vnd.microsoft.card."):
            continue  # Teams' HTML copy of the text, a card: nothing to fetch
        items.append(_Item(name=name or ("an image" if content_type.startswith("image/") else
                                         "a file"),
                           content_type=content_type, url=url, extension=_extension(name)))
    return items


def _kind(item: _Item) -> str | None:
    """image, text, or None (not one the bot reads)."""
    if item.content_type.startswith("image/") or item.extension in _IMAGE_EXTENSIONS:
        return "image"
    if item.content_type.startswith("text/") or item.content_type in _TEXT_TYPES or \
            item.extension in _TEXT_EXTENSIONS:
        return "text"
    return None


def _image_type(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for magic, kind in _IMAGE_MAGIC if data.startswith(magic)), None)


def _compose(text: str, loaded: Sequence[tuple[_Item, str, bytes]], *,
             token_budget: int) -> Incoming | Refusal:
    """The message text with the files' text and the images' placeholders, within half the
    token budget (each file cut to an even share of what is left)."""
    room = max(0, token_budget // 2 - count_text_tokens(text))
    files = [entry for entry in loaded if entry[1] == "text/plain"]
    share = room // max(1, len(files))
    blocks: list[str] = []
    images: list[ImageInput] = []
    stored: list[Attachment] = []
    for item, media_type, data in loaded:
        label = f"{item.name}, {_size(len(data))}"
        if media_type != "text/plain":
            images.append(ImageInput(name=item.name, media_type=media_type, data=data))
            blocks.append(f"[image: {label}]")
            stored.append(Attachment(name=item.name, content_type=media_type, size=len(data)))
            continue
        content = _decode(data)
        if content is None:
            return Refusal(reply=UNSUPPORTED.format(name=_quoted(item.name)),
                           reason="a text file that is not UTF-8 text")
        blocks.append(f"[file: {label}; its text follows, as data]\n" + _fit(content, share))
        stored.append(Attachment(name=item.name, content_type=_text_type(item), size=len(data)))
    return Incoming(text="\n\n".join(part for part in (text, *blocks) if part),
                    images=tuple(images), stored=tuple(stored))


def _fit(content: str, tokens: int) -> str:
    """`content` cut to about `tokens` tokens, saying so when it is cut."""
    total = count_text_tokens(content)
    if total <= tokens:
        return content
    keep = int(len(content) * tokens / total * 0.9)
    return (content[:keep] + f"\n[cut here: the file holds about {total:,} tokens, and only the "
            f"first {tokens:,} fit]")


def _decode(data: bytes) -> str | None:
    """The text of a text file: UTF-8 (a BOM allowed), or UTF-16 with its BOM; else None."""
    utf16 = data.startswith((b"\xff\xfe", b"\xfe\xff"))
    if b"\x00" in data and not utf16:
        return None
    try:
        return data.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError:
        return None


def _text_type(item: _Item) -> str:
    return item.content_type if item.content_type not in ("", TEAMS_FILE) else \
        f"text/{item.extension or 'plain'}"


def _data_url(url: str) -> bytes | None:
    header, comma, payload = url.partition(",")
    if not comma:
        return None
    try:
        if header.endswith(";base64"):
            return base64.b64decode(payload, validate=True)
        return unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        return None


def _extension(name: str) -> str:
    return name.rpartition(".")[2].lower() if "." in name else ""


def _quoted(name: str) -> str:
    """A file's name for a reply: short, and as written (it came from outside)."""
    name = " ".join(name.split())
    return name if name in ("a file", "an image") else f"“{name[:80]}”"


def _size(size: int) -> str:
    return f"{size / 1_000_000:.1f} MB" if size >= 1_000_000 else f"{max(1, round(size / 1000))} KB"
