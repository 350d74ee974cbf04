"""Tools (functions) the model may call: their JSON schemas, argument checks, and safe invocation.

A tool is an async Python function. Its schema comes from its type hints (through pydantic, which
the openai SDK already brings) or is given explicitly, as a JSON schema dict or a pydantic model,
the way the Teams SDK's `Function(name, description, parameter_schema, handler)` takes it. A tool
that raises, runs late or gets arguments that fail its schema gives the model an error result
instead of failing the turn (its log line names the tool and the kind of failure; the reason,
which may quote the arguments, is logged only when message capture is on).

A tool may return `ToolOutput(text, sources=...)`: the sources (title, URL, snippet) are numbered
for the turn and the model is asked to cite them as [n] (`shared/prompt.py`). Tools from MCP
servers (`shared/mcp.py`) are `Function`s too.

Each tool has a policy (`shared/policy.py`): `invoke` itself refuses a `never` tool, and an `ask`
tool's call that a person has not approved, whatever the caller. A tool's definition (name,
description and schema, as the model reads it) is at most `MAX_TOOL_SPEC_CHARS`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_type_hints

from . import telemetry
from .messages import ToolCall
from .policy import ToolPolicy

if TYPE_CHECKING:
    import pydantic

__all__ = ["MAX_TOOL_RESULT_CHARS", "MAX_TOOL_SPEC_CHARS", "UNKNOWN_TOOL", "Function", "Source",
           "ToolOutput", "ToolResult", "failed", "tool"]

log = logging.getLogger(__name__)
#: A tool result longer than this is cut, so that a turn stays within the store's limits.
MAX_TOOL_RESULT_CHARS = 20_000
#: A tool's definition (its `tools` entry as JSON) may be this long; a longer one is refused
#: (an MCP server's 380 KB input schema made every model request 380 KB).
MAX_TOOL_SPEC_CHARS = 16_000
#: How logs, spans and metrics name a tool the model called that does not exist (its name is the
#: model's text).
UNKNOWN_TOOL = "unknown"

Handler = Callable[..., Awaitable[Any]]
#: A source's title and snippet are cut to these lengths (Teams shows at most 80 and 160).
MAX_SOURCE_TITLE_CHARS = 80
MAX_SOURCE_SNIPPET_CHARS = 160
#: At most this many sources are kept from one tool result.
MAX_SOURCES_PER_RESULT = 10


@dataclass(frozen=True, kw_only=True)
class Source:
    """Something a tool result is based on, which a reply may cite."""

    title: str
    url: str | None = None
    snippet: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "title", _one_line(self.title, MAX_SOURCE_TITLE_CHARS) or
                           _one_line(self.url or "", MAX_SOURCE_TITLE_CHARS) or "source")
        object.__setattr__(self, "snippet", _one_line(self.snippet, MAX_SOURCE_SNIPPET_CHARS))
        url = (self.url or "").strip()
        object.__setattr__(self, "url", url if url.startswith(("https://", "http://")) else None)


@dataclass(frozen=True)
class ToolOutput:
    """What a tool may return instead of a plain value: its text and the sources it came from."""

    text: str
    sources: tuple[Source, ...] = ()


@dataclass(frozen=True, kw_only=True)
class ToolResult:
    """A finished call: the text the model reads (an error as `{"error": ...}`) and its sources."""

    text: str
    sources: tuple[Source, ...] = ()
    failed: bool = False


@dataclass(frozen=True)
class Function:
    """A tool: `handler` is awaited with the validated arguments.

    `parameter_schema` may be a JSON schema dict (the handler gets keyword arguments), a pydantic
    model class (the handler gets one instance of it, as in the Teams SDK), or None (derived from
    the handler's type hints; the handler gets keyword arguments).
    """

    name: str
    description: str
    handler: Handler
    parameter_schema: dict[str, Any] | type[pydantic.BaseModel] | None = None
    #: Where the tool runs: `python` (in this app) or `mcp:<server>` (telemetry and logs).
    origin: str = "python"
    #: Whether a call runs by itself, needs a person's approval first, or never runs.
    policy: ToolPolicy = ToolPolicy.AUTO
    _model: type[pydantic.BaseModel] | None = field(default=None, init=False, repr=False)
    _schema: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    _spec: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.name.replace("_", "").replace("-", "").isalnum() or len(self.name) > 64:
            raise ValueError(f"tool name {self.name!r}: use 1-64 letters, digits, _ or -")
        if not inspect.iscoroutinefunction(self.handler):
            raise TypeError(f"tool {self.name!r}: the handler must be an async function")
        object.__setattr__(self, "policy", ToolPolicy(self.policy))
        schema = self.parameter_schema
        if isinstance(schema, dict):
            if (size := _json_size(schema)) > MAX_TOOL_SPEC_CHARS:  # before it is parsed
                raise ValueError(f"tool {self.name!r}: its schema is {size:,} characters; a "
                                 f"tool's definition may have {MAX_TOOL_SPEC_CHARS:,}")
            import jsonschema

            jsonschema.Draft202012Validator.check_schema(schema)
            object.__setattr__(self, "_schema", schema)
        elif schema is not None:  # a pydantic model: pydantic is loaded already
            self._parameters()
        else:  # from the type hints: checked now, the model built on first use (pydantic takes
            _check_signature(self.name, self.handler)  # 60 ms of a cold start)

    def _parameters(self) -> dict[str, Any]:
        """The parameters' JSON schema (and the model that validates them), built once."""
        if self._schema:
            return self._schema
        import pydantic

        schema = self.parameter_schema
        if isinstance(schema, type) and issubclass(schema, pydantic.BaseModel):
            model = schema
        else:
            model = _model_from_signature(self.name, self.handler)
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_schema", model.model_json_schema())
        return self._schema

    def spec(self) -> dict[str, Any]:
        """The Chat Completions `tools` entry (built once); ValueError when it is longer than
        `MAX_TOOL_SPEC_CHARS`."""
        if self._spec:
            return self._spec
        parameters = {key: value for key, value in self._parameters().items() if key != "title"}
        parameters.setdefault("type", "object")
        parameters.setdefault("properties", {})
        spec = {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": parameters}}
        if (size := _json_size(spec)) > MAX_TOOL_SPEC_CHARS:
            raise ValueError(f"tool {self.name!r}: its definition is {size:,} characters; at most "
                             f"{MAX_TOOL_SPEC_CHARS:,}")
        object.__setattr__(self, "_spec", spec)
        return spec

    async def invoke(self, call: ToolCall, *, time_limit: float, approved: bool = False) -> ToolResult:
        """Run the call: its result as text; any failure becomes an error the model can read.

        `approved`: a person approved this exact call (an `ask` tool runs only then)."""
        if self.policy is ToolPolicy.NEVER:
            return failed(call, "not allowed: this tool may not be used")
        if self.policy is ToolPolicy.ASK and not approved:
            return failed(call, "not approved: this tool runs only when a person approves the call")
        try:
            arguments = json.loads(call.arguments or "{}")
            if not isinstance(arguments, dict):
                raise ValueError("arguments must be a JSON object")
        except ValueError as exc:
            return failed(call, f"invalid arguments: {exc}")
        import jsonschema
        import pydantic

        try:
            awaitable = self._bind(arguments)
        except (pydantic.ValidationError, jsonschema.ValidationError) as exc:
            return failed(call, f"arguments do not match the schema: {_short(exc)}")
        except TypeError as exc:  # the schema allowed what the handler's signature does not
            return failed(call, f"arguments do not fit the tool: {exc}")
        try:
            value = await asyncio.wait_for(awaitable, timeout=time_limit)
            sources: tuple[Source, ...] = ()
            if isinstance(value, ToolOutput):
                text, sources = value.text, value.sources[:MAX_SOURCES_PER_RESULT]
            elif isinstance(value, str):
                text = value
            else:
                text = json.dumps(value, ensure_ascii=False, default=str)
        except TimeoutError:
            return failed(call, f"the tool did not finish within {time_limit:g} s")
        except OSError as exc:  # its text names files: the model and the log get the kind only
            return failed(call, f"{type(exc).__name__}: {exc.strerror or 'operating system error'}")
        except Exception as exc:  # a tool's failure, whatever it is, is reported to the model
            return failed(call, f"{type(exc).__name__}: {exc}")
        if len(text) > MAX_TOOL_RESULT_CHARS:
            text = text[:MAX_TOOL_RESULT_CHARS] + " …[truncated]"
        return ToolResult(text=text, sources=sources)

    def _bind(self, arguments: dict[str, Any]) -> Awaitable[Any]:
        import jsonschema

        self._parameters()
        if self._model is not None and self.parameter_schema is not None:
            return self.handler(self._model.model_validate(arguments))
        if self._model is not None:
            validated = self._model.model_validate(arguments)
            return self.handler(**{name: getattr(validated, name) for name in type(validated).model_fields})
        jsonschema.validate(arguments, self._schema)
        return self.handler(**arguments)


def tool(handler: Handler | None = None, *, name: str | None = None,
         description: str | None = None,
         policy: ToolPolicy | Literal["auto", "ask", "never"] = ToolPolicy.AUTO) -> Any:
    """Make an async function a `Function`; its docstring's first paragraph is the description.
    `policy="ask"`: a person approves each call first (`shared/policy.py`).

        @tool
        async def get_current_time(time_zone: str) -> str:
            "The current time in an IANA time zone such as Europe/Paris."
    """
    def wrap(function: Handler) -> Function:
        text = description or (inspect.getdoc(function) or "").split("\n\n")[0].strip()
        return Function(name or function.__name__, text or function.__name__, function,
                        policy=ToolPolicy(policy))

    return wrap(handler) if handler is not None else wrap


def _check_signature(name: str, handler: Handler) -> None:
    for parameter in inspect.signature(handler).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise TypeError(f"tool {name!r}: *args and **kwargs cannot be described to a model")


def _model_from_signature(name: str, handler: Handler) -> type[pydantic.BaseModel]:
    import pydantic

    _check_signature(name, handler)
    hints = get_type_hints(handler, include_extras=True)
    fields: dict[str, Any] = {}
    for parameter in inspect.signature(handler).parameters.values():
        annotation = hints.get(parameter.name, str)
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[parameter.name] = (annotation, default)
    config = pydantic.ConfigDict(extra="forbid")
    return pydantic.create_model(f"{name}_arguments", __config__=config, **fields)


def _short(exc: Exception) -> str:
    import pydantic

    if isinstance(exc, pydantic.ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}"
                         for e in exc.errors()[:5])
    return str(getattr(exc, "message", exc))[:500]


def failed(call: ToolCall, reason: str, *, known: bool = True) -> ToolResult:
    """A call that failed (or could not run), as the model reads it; logged without arguments.
    `known` False: the model named a tool that does not exist, logged as `UNKNOWN_TOOL`."""
    # The reason may quote the arguments (taken from the user's text): logged only with capture.
    capture = telemetry.state.capture_content
    shown = reason if capture else reason.split(":", 1)[0]
    name = call.name if known or capture else UNKNOWN_TOOL
    log.warning("tool %s (call %s) failed: %s", name, call.id[:64], shown)
    return ToolResult(text=json.dumps({"error": reason}, ensure_ascii=False), failed=True)


def _json_size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, default=str))


def _one_line(text: str, limit: int) -> str:
    """`text` on one line (control characters and runs of spaces as one space), cut to `limit`."""
    flat = " ".join("".join(" " if unicodedata.category(c)[0] == "C" else c for c in text).split())
    return flat if len(flat) <= limit else flat[:limit - 1].rstrip() + "…"
