"""HTTP trigger routes matched as the Functions host matches them (ASP.NET Core routing).

- Paths are compared after Kestrel's decoding, which decodes every escape except `%2F`: so a route
  parameter receives `a%2Fb` literally, and `a%3Ab` arrives as `a:b`.
- Literal segments match case-insensitively; a trailing slash is accepted (no redirect).
- `{name}` takes one non-empty segment, `{name?}` may be missing at the end, `{*name}` takes the
  rest; constraints `{id:int}`, `:long`, `:bool`, `:guid`, `:alpha` are checked, others accepted.
- A route whose methods exclude the request's does not match (the host answers 404, not 405).
- Literal routes win over parameter routes, as in ASP.NET Core.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

_SLASH_ESCAPE = re.compile(r"(%2[Ff])")
_CONSTRAINTS: dict[str, Callable[[str], bool]] = {
    "int": lambda v: re.fullmatch(r"-?\d+", v) is not None and -2**31 <= int(v) < 2**31,
    "long": lambda v: re.fullmatch(r"-?\d+", v) is not None and -2**63 <= int(v) < 2**63,
    "bool": lambda v: v.lower() in ("true", "false"),
    "alpha": lambda v: re.fullmatch(r"[A-Za-z]+", v) is not None,
    "guid": lambda v: _is_guid(v),
}


def decode_path(raw_path: str) -> str:
    """The request path as Kestrel gives it to routing: decoded, except that `%2F` stays."""
    return "".join(part if _SLASH_ESCAPE.fullmatch(part) else unquote(part)
                   for part in _SLASH_ESCAPE.split(raw_path))


@dataclass(frozen=True)
class _Segment:
    literal: str | None = None
    name: str = ""
    optional: bool = False
    catch_all: bool = False
    constraint: str = ""


@dataclass(frozen=True)
class Route[T]:
    """One route template (route prefix included) and what it leads to."""

    template: str
    methods: frozenset[str]  # empty: every method
    target: T

    def __post_init__(self) -> None:
        object.__setattr__(self, "_segments", tuple(_parse(self.template)))

    @property
    def segments(self) -> tuple[_Segment, ...]:
        return self._segments  # type: ignore[attr-defined, no-any-return]

    def match(self, path: str) -> dict[str, str] | None:
        """The route values when the decoded `path` matches this template, else None."""
        parts = [part for part in path.strip("/").split("/")] if path.strip("/") else []
        values: dict[str, str] = {}
        for index, segment in enumerate(self.segments):
            if segment.catch_all:
                if parts[index:]:
                    values[segment.name] = "/".join(parts[index:])
                return values
            if index >= len(parts):
                return values if all(s.optional or s.catch_all for s in self.segments[index:]) else None
            part = parts[index]
            if segment.literal is not None:
                if part.lower() != segment.literal.lower():
                    return None
            elif not part or (segment.constraint in _CONSTRAINTS and not _CONSTRAINTS[segment.constraint](part)):
                return None
            else:
                values[segment.name] = part
        return values if len(parts) == len(self.segments) else None


class Router[T]:
    """The app's HTTP routes; `find` picks the one the host would."""

    def __init__(self, routes: list[Route[T]]) -> None:
        # ASP.NET Core prefers literal segments to parameters, segment by segment.
        self.routes = sorted(routes, key=lambda r: [0 if s.literal is not None else 1 if not s.catch_all
                                                    else 2 for s in r.segments])

    def find(self, method: str, path: str) -> tuple[Route[T], dict[str, str]] | None:
        for route in self.routes:
            if route.methods and method.upper() not in route.methods:
                continue
            values = route.match(path)
            if values is not None:
                return route, values
        return None


def _parse(template: str) -> list[_Segment]:
    segments = []
    for part in template.strip("/").split("/"):
        if not part:
            continue
        found = re.fullmatch(r"\{(\*{1,2})?([A-Za-z_][A-Za-z0-9_]*)(?::([A-Za-z]+)[^}]*)?(\?)?\}", part)
        if found is None:
            if "{" in part or "}" in part:
                raise ValueError(f"route {template!r}: the dev host reads only whole-segment parameters, "
                                 f"not {part!r}")
            segments.append(_Segment(literal=part))
        else:
            catch_all, name, constraint, optional = found.groups()
            segments.append(_Segment(name=name, catch_all=bool(catch_all), optional=bool(optional),
                                     constraint=(constraint or "").lower()))
    return segments


def _is_guid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
