"""Tools (functions) the model may call: their JSON schemas, argument checks, and safe invocation.

A tool is an async Python function. Its schema comes from its type hints (through pydantic, which
the openai SDK already brings) or is given explicitly, as a JSON schema dict or a pydantic model,
the way the Teams SDK's `Function(name, description, parameter_schema, handler)` takes it. A tool
that raises, runs late or gets arguments that fail its schema gives the model an error result
instead of failing the turn.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import jsonschema
import pydantic

from .messages import ToolCall

__all__ = ["MAX_TOOL_RESULT_CHARS", "Function", "tool"]

log = logging.getLogger(__name__)
#: A tool result longer than this is cut, so that a turn stays within the store's limits.
MAX_TOOL_RESULT_CHARS = 20_000

Handler = Callable[..., Awaitable[Any]]


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
    _model: type[pydantic.BaseModel] | None = field(default=None, init=False, repr=False)
    _schema: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.name.replace("_", "").replace("-", "").isalnum() or len(self.name) > 64:
            raise ValueError(f"tool name {self.name!r}: use 1-64 letters, digits, _ or -")
        if not inspect.iscoroutinefunction(self.handler):
            raise TypeError(f"tool {self.name!r}: the handler must be an async function")
        schema = self.parameter_schema
        if isinstance(schema, type) and issubclass(schema, pydantic.BaseModel):
            object.__setattr__(self, "_model", schema)
            object.__setattr__(self, "_schema", schema.model_json_schema())
        elif isinstance(schema, dict):
            jsonschema.Draft202012Validator.check_schema(schema)
            object.__setattr__(self, "_schema", schema)
        else:
            model = _model_from_signature(self.name, self.handler)
            object.__setattr__(self, "_model", model)
            object.__setattr__(self, "_schema", model.model_json_schema())

    def spec(self) -> dict[str, Any]:
        """The Chat Completions `tools` entry."""
        parameters = {key: value for key, value in self._schema.items() if key != "title"}
        parameters.setdefault("type", "object")
        parameters.setdefault("properties", {})
        return {"type": "function",
                "function": {"name": self.name, "description": self.description,
                             "parameters": parameters}}

    async def invoke(self, call: ToolCall, *, time_limit: float) -> str:
        """Run the call: its result as text; any failure becomes an error the model can read."""
        try:
            arguments = json.loads(call.arguments or "{}")
            if not isinstance(arguments, dict):
                raise ValueError("arguments must be a JSON object")
        except ValueError as exc:
            return _failed(call, f"invalid arguments: {exc}")
        try:
            awaitable = self._bind(arguments)
        except (pydantic.ValidationError, jsonschema.ValidationError) as exc:
            return _failed(call, f"arguments do not match the schema: {_short(exc)}")
        except TypeError as exc:  # the schema allowed what the handler's signature does not
            return _failed(call, f"arguments do not fit the tool: {exc}")
        try:
            value = await asyncio.wait_for(awaitable, timeout=time_limit)
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        except TimeoutError:
            return _failed(call, f"the tool did not finish within {time_limit:g} s")
        except OSError as exc:  # its text names files: the model and the log get the kind only
            return _failed(call, f"{type(exc).__name__}: {exc.strerror or 'operating system error'}")
        except Exception as exc:  # a tool's failure, whatever it is, is reported to the model
            return _failed(call, f"{type(exc).__name__}: {exc}")
        if len(text) > MAX_TOOL_RESULT_CHARS:
            text = text[:MAX_TOOL_RESULT_CHARS] + " …[truncated]"
        return text

    def _bind(self, arguments: dict[str, Any]) -> Awaitable[Any]:
        if self._model is not None and self.parameter_schema is not None:
            return self.handler(self._model.model_validate(arguments))
        if self._model is not None:
            validated = self._model.model_validate(arguments)
            return self.handler(**{name: getattr(validated, name) for name in type(validated).model_fields})
        jsonschema.validate(arguments, self._schema)
        return self.handler(**arguments)


def tool(handler: Handler | None = None, *, name: str | None = None,
         description: str | None = None) -> Any:
    """Make an async function a `Function`; its docstring's first paragraph is the description.

        @tool
        async def get_current_time(time_zone: str) -> str:
            "The current time in an IANA time zone such as Europe/Paris."
    """
    def wrap(function: Handler) -> Function:
        text = description or (inspect.getdoc(function) or "").split("\n\n")[0].strip()
        return Function(name or function.__name__, text or function.__name__, function)

    return wrap(handler) if handler is not None else wrap


def _model_from_signature(name: str, handler: Handler) -> type[pydantic.BaseModel]:
    hints = get_type_hints(handler, include_extras=True)
    fields: dict[str, Any] = {}
    for parameter in inspect.signature(handler).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise TypeError(f"tool {name!r}: *args and **kwargs cannot be described to a model")
        annotation = hints.get(parameter.name, str)
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[parameter.name] = (annotation, default)
    config = pydantic.ConfigDict(extra="forbid")
    return pydantic.create_model(f"{name}_arguments", __config__=config, **fields)


def _short(exc: Exception) -> str:
    if isinstance(exc, pydantic.ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}"
                         for e in exc.errors()[:5])
    return str(getattr(exc, "message", exc))[:500]


def _failed(call: ToolCall, reason: str) -> str:
    log.warning("tool %s (call %s) failed: %s", call.name, call.id, reason)
    return json.dumps({"error": reason}, ensure_ascii=False)
