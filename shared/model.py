"""The model client: one Chat Completions call through the openai SDK, its errors translated.

`build_model(settings)` picks OpenAI (or any compatible server), Azure OpenAI (key or Entra ID),
or the offline stand-in. This is the only module that sees openai exceptions. The openai package
(half a second to import, most of a cold start) is imported when the first model call or check
needs the client, not when the app starts: the webhook that only accepts a message never does.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from azure.core.exceptions import ClientAuthenticationError

from . import telemetry
from .errors import (
    ContentFiltered,
    ModelError,
    ModelMisconfigured,
    ModelRejected,
    ModelTimeout,
    ModelUnavailable,
)
from .listeners import TextListener
from .messages import ChatMessage, ToolCall, Usage
from .settings import ModelProvider, ModelSettings

if TYPE_CHECKING:
    import httpx2
    import openai

__all__ = ["AZURE_OPENAI_SCOPE", "ChatModel", "Completion", "ModelCheck", "ModelState",
           "TextListener", "build_model"]

log = logging.getLogger(__name__)
AZURE_OPENAI_SCOPE = "https://cognitiveservices.azure.com/.default"


class ModelState(StrEnum):
    """What is known of the model endpoint: from the start-up check, then from each call."""

    UNCHECKED = "unchecked"
    OK = "ok"
    #: 401/403: the key, the identity's role or the endpoint is wrong (permanent).
    REFUSED = "refused"
    #: 404: no such model or deployment (permanent).
    MISSING = "missing"
    #: refused connection, timeout, 429 or 5xx (transient).
    UNREACHABLE = "unreachable"
    #: it answered the check, but not as expected (another 4xx, an odd body).
    FAILING = "failing"


#: How long the start-up check waits for the model endpoint.
CHECK_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True, kw_only=True)
class ModelCheck:
    state: ModelState
    #: One line: what was seen and, when it is wrong, what to fix.
    detail: str

    @property
    def permanent(self) -> bool:
        """A setup problem: retrying will fail the same way until a setting or role is fixed."""
        return self.state in (ModelState.REFUSED, ModelState.MISSING)


@dataclass(frozen=True, kw_only=True)
class Completion:
    message: ChatMessage
    finish_reason: str
    usage: Usage
    model: str


class ChatModel:
    """A chat model behind an `openai.AsyncOpenAI` client (OpenAI, Azure OpenAI or compatible)."""

    def __init__(self, *, client: openai.AsyncOpenAI | None = None,
                 connect: Callable[[], openai.AsyncOpenAI] | None = None, model: str,
                 max_reply_tokens: int | None = None,
                 reply_tokens_field: str = "max_completion_tokens") -> None:
        """`client`, or `connect`: builds it when it is first needed."""
        if client is None and connect is None:
            raise ValueError("a ChatModel needs a client or a way to connect one")
        self._client = client
        self._connect = connect
        self.model = model
        self._max_reply_tokens = max_reply_tokens
        self._reply_tokens_field = reply_tokens_field
        #: The last known state of the endpoint (health shows it).
        self.last_check = ModelCheck(state=ModelState.UNCHECKED, detail="not checked yet")

    async def complete(self, messages: list[dict[str, Any]], *,
                       tools: list[dict[str, Any]] | None = None,
                       on_text: TextListener | None = None) -> Completion:
        """One completion; raises a `ModelError` subclass when the call fails for good.

        With `on_text` the model streams: `on_text` gets the reply's text so far after each piece.
        What it raises ends the call at once (the stream is closed: no more tokens are paid) and
        reaches the caller as it is.
        """
        with telemetry.model_call(model=self.model, provider=self._provider,
                                  max_tokens=self._max_reply_tokens, messages=messages,
                                  failures=(ModelError,)) as current:
            try:
                completion = await self._complete(messages, tools=tools, on_text=on_text)
            except ModelError as exc:
                self.last_check = _state_of(exc) or self.last_check
                raise
            self.last_check = ModelCheck(state=ModelState.OK, detail="the last call answered")
            usage = completion.usage
            telemetry.completed(current, model=completion.model,
                                input_tokens=usage.prompt_tokens,
                                output_tokens=usage.completion_tokens,
                                cached_tokens=usage.cached_tokens,
                                finish_reason=completion.finish_reason,
                                output=completion.message.to_openai())
            return completion

    @property
    def client(self) -> openai.AsyncOpenAI:
        """The openai client, built on first use."""
        if self._client is None:
            assert self._connect is not None
            self._client = self._connect()
        return self._client

    @property
    def _provider(self) -> str:
        """gen_ai.provider.name: Azure OpenAI, or OpenAI (and compatible servers)."""
        import openai

        return "azure.ai.openai" if isinstance(self.client, openai.AsyncAzureOpenAI) else "openai"

    async def _complete(self, messages: list[dict[str, Any]], *,
                        tools: list[dict[str, Any]] | None,
                        on_text: TextListener | None) -> Completion:
        options: dict[str, Any] = {}
        if self._max_reply_tokens:
            options[self._reply_tokens_field] = self._max_reply_tokens
        if on_text is not None:
            options.update(stream=True, stream_options={"include_usage": True})
        # Our messages and tools are already in wire format. Passed as `messages=`, the SDK would
        # re-walk every one through its TypedDict transform (the largest CPU cost of a turn, and
        # it grows with the window); in `extra_body` they go out as they are.
        wire: dict[str, Any] = {"messages": messages}
        if tools:
            wire["tools"] = tools
        import openai

        try:
            response = await self.client.chat.completions.create(
                model=self.model, messages=[], extra_body=wire, **options)
            if on_text is None:
                return _completion(response, fallback_model=self.model)
            async with response:
                return await _streamed(response, on_text, fallback_model=self.model)
        except (openai.OpenAIError, ClientAuthenticationError) as exc:
            raise self._translated(exc) from exc

    async def check(self) -> ModelCheck:
        """Whether the endpoint knows our key and model, spending no tokens: OpenAI's
        GET /models/{model}; a compatible server's GET /models; Azure OpenAI's chat completions of
        the deployment with no messages (a 400 then means key and deployment are right)."""
        import openai

        client = self.client.with_options(timeout=CHECK_TIMEOUT_SECONDS, max_retries=0)
        try:
            if isinstance(client, openai.AsyncAzureOpenAI):
                try:
                    await client.chat.completions.create(model=self.model, messages=[])
                except openai.BadRequestError:
                    pass  # the deployment exists and took our credentials; it wants messages
            elif self._compatible:
                try:
                    await client.models.list()
                except openai.NotFoundError:
                    pass  # answers, but lists no models (not every compatible server does)
            else:
                await client.models.retrieve(self.model)
        except (openai.OpenAIError, ClientAuthenticationError) as exc:
            error = self._translated(exc)
            self.last_check = _state_of(error) or ModelCheck(state=ModelState.FAILING,
                                                             detail=str(error))
            return self.last_check
        self.last_check = ModelCheck(state=ModelState.OK,
                                     detail=f"{self.model} answers (no tokens spent)")
        return self.last_check

    async def known_state(self) -> ModelCheck:
        """The last known state; checked again (no tokens) unless it is OK or a setup problem,
        which only a restart with new settings changes."""
        if self.last_check.state is ModelState.OK or self.last_check.permanent:
            return self.last_check
        return await self.check()

    @property
    def _compatible(self) -> bool:
        """An OpenAI-compatible server (Ollama, vLLM...), not OpenAI itself."""
        return "api.openai.com" not in str(self.client.base_url)

    def _translated(self, exc: openai.OpenAIError | ClientAuthenticationError) -> ModelError:
        """The `ModelError` for an openai exception, or for azure-identity finding no token."""
        import openai

        if isinstance(exc, ClientAuthenticationError):
            return ModelMisconfigured(
                "no Entra ID token for Azure OpenAI: locally run `az login` (or set "
                "AZURE_OPENAI_API_KEY); in Azure check AZURE_CLIENT_ID names the app's identity "
                f"({type(exc).__name__})", answered=401)
        if isinstance(exc, openai.APITimeoutError):
            if _refused(exc):
                return ModelUnavailable(f"cannot reach the model: {_refused(exc)}")
            return ModelTimeout("the model did not answer in time")
        if isinstance(exc, openai.APIConnectionError):
            return ModelUnavailable(f"cannot reach the model: {exc}")
        if isinstance(exc, openai.APIStatusError):
            return _status_error(exc, azure=isinstance(self.client, openai.AsyncAzureOpenAI))
        return ModelError(f"model call failed: {type(exc).__name__}")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


def _refused(exc: BaseException) -> BaseException | None:
    """The connection failure under a timeout error, if it is one: the SDK's aiohttp adapter
    reports a refused connection as a connect timeout."""
    import aiohttp

    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, aiohttp.ClientConnectorError) and \
                not isinstance(cause, aiohttp.ConnectionTimeoutError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def _status_error(exc: openai.APIStatusError, *, azure: bool) -> ModelError:
    body = exc.body if isinstance(exc.body, dict) else {}
    code = str(body.get("code") or (body.get("error") or {}).get("code") or "")
    if code == "content_filter" or "content_filter" in str(exc.message):
        return ContentFiltered("the model endpoint's content filter blocked the prompt")
    if exc.status_code == 429 or exc.status_code >= 500:
        return ModelUnavailable(f"the model answered {exc.status_code} after retries")
    if exc.status_code in _SETUP_ADVICE:
        advice = _SETUP_ADVICE[exc.status_code][azure]
        return ModelMisconfigured(f"the model answered {exc.status_code}: {advice}",
                                  answered=exc.status_code)
    # The provider's message may quote the prompt: it is kept (in logs and spans) only when
    # message capture is on; otherwise its error code says what went wrong.
    if telemetry.state.capture_content:
        return ModelRejected(f"the model answered {exc.status_code}: {exc.message}")
    return ModelRejected(f"the model answered {exc.status_code} ({code[:64] or 'no error code'})")


#: What to fix when the model endpoint answers 401, 403 or 404: (OpenAI or compatible, Azure).
_SETUP_ADVICE = {
    401: ("the key was refused: check OPENAI_API_KEY (and OPENAI_BASE_URL)",
          "the key or token was refused: check AZURE_OPENAI_API_KEY, or unset it to use Entra ID"),
    403: ("the key may not use this model or project: check OPENAI_API_KEY and OPENAI_MODEL",
          "access denied: give the identity (AZURE_CLIENT_ID) the Cognitive Services OpenAI User "
          "role, or check the resource's network rules"),
    404: ("no such model: check OPENAI_MODEL (and OPENAI_BASE_URL, which should end in /v1)",
          "no such deployment: check AZURE_OPENAI_DEPLOYMENT and AZURE_OPENAI_ENDPOINT"),
}


def _state_of(error: ModelError) -> ModelCheck | None:
    """The endpoint's state as one failed call shows it (None: the call says nothing of it)."""
    if isinstance(error, ModelMisconfigured):
        return ModelCheck(state=ModelState.MISSING if error.answered == 404 else ModelState.REFUSED,
                          detail=str(error))
    if isinstance(error, (ModelUnavailable, ModelTimeout)):
        return ModelCheck(state=ModelState.UNREACHABLE, detail=str(error))
    return None


def _usage(raw: Any) -> Usage:
    """Tokens paid, with the provider's prompt-cache hits (`prompt_tokens_details.cached_tokens`)."""
    details = getattr(raw, "prompt_tokens_details", None)
    return Usage(prompt_tokens=getattr(raw, "prompt_tokens", 0) or 0,
                 completion_tokens=getattr(raw, "completion_tokens", 0) or 0,
                 cached_tokens=getattr(details, "cached_tokens", 0) or 0)


def _completion(response: Any, *, fallback_model: str) -> Completion:
    if not getattr(response, "choices", None):
        raise ModelError("the model answered with no choices")
    choice = response.choices[0]
    finish_reason = str(choice.finish_reason or "stop")
    if finish_reason == "content_filter":
        raise ContentFiltered("the model endpoint's content filter blocked the reply")
    raw_calls = choice.message.tool_calls or []
    calls = tuple(ToolCall(id=call.id, name=call.function.name,
                           arguments=call.function.arguments or "{}") for call in raw_calls)
    usage = _usage(response.usage)
    model = str(getattr(response, "model", None) or fallback_model)
    message = ChatMessage(role="assistant", content=choice.message.content, tool_calls=calls,
                          model=model, usage=usage)
    return Completion(message=message, finish_reason=finish_reason, usage=usage, model=model)


async def _streamed(stream: Any, on_text: TextListener, *, fallback_model: str) -> Completion:
    """A streamed completion, assembled: content pieces joined, tool-call pieces by index."""
    text = ""
    calls: dict[int, dict[str, str]] = {}
    finish_reason, usage, model = "stop", Usage(), fallback_model
    async for chunk in stream:
        model = str(getattr(chunk, "model", None) or model)
        if chunk.usage is not None:
            usage = _usage(chunk.usage)
        for choice in chunk.choices or ():
            delta = choice.delta
            if choice.finish_reason:
                finish_reason = str(choice.finish_reason)
            for piece in getattr(delta, "tool_calls", None) or ():
                call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = piece.id or call["id"]
                if piece.function is not None:
                    call["name"] += piece.function.name or ""
                    call["arguments"] += piece.function.arguments or ""
            if getattr(delta, "content", None):
                text += delta.content
                await on_text(text)
    if finish_reason == "content_filter":
        raise ContentFiltered("the model endpoint's content filter blocked the reply")
    tool_calls = tuple(ToolCall(id=call["id"], name=call["name"], arguments=call["arguments"] or "{}")
                       for _, call in sorted(calls.items()))
    message = ChatMessage(role="assistant", content=text if text or not tool_calls else None,
                          tool_calls=tool_calls, model=model, usage=usage)
    return Completion(message=message, finish_reason=finish_reason, usage=usage, model=model)


def build_model(settings: ModelSettings, *, http_client: httpx2.AsyncClient | None = None,
                credential: Any | None = None) -> ChatModel:
    """The `ChatModel` the settings describe. `http_client` and `credential` are test seams."""
    connect = functools.partial(_client, settings, http_client=http_client, credential=credential)
    if settings.provider is ModelProvider.AZURE and settings.azure_endpoint:
        return ChatModel(connect=connect, model=settings.model,
                         max_reply_tokens=settings.max_reply_tokens, reply_tokens_field="max_tokens")
    if settings.provider is ModelProvider.OFFLINE:
        return ChatModel(connect=connect, model=settings.model,
                         max_reply_tokens=settings.max_reply_tokens)
    # OpenAI itself wants max_completion_tokens; compatible servers (Ollama, vLLM) know max_tokens.
    field = "max_tokens" if settings.base_url else "max_completion_tokens"
    return ChatModel(connect=connect, model=settings.model,
                     max_reply_tokens=settings.max_reply_tokens, reply_tokens_field=field)


def _client(settings: ModelSettings, *, http_client: httpx2.AsyncClient | None,
            credential: Any | None) -> openai.AsyncOpenAI:
    """The openai client the settings describe (built on a model's first call)."""
    import httpx2
    import openai

    common: dict[str, Any] = {"max_retries": settings.max_retries, "timeout": settings.timeout_seconds}
    if settings.provider is ModelProvider.OFFLINE:
        from .offline import offline_transport

        http_client = http_client or httpx2.AsyncClient(transport=offline_transport())
    # The SDK's own aiohttp client: httpx's pool polls every open connection per request placed,
    # a third of a worker's CPU with 200 turns in flight (benchmarks/README.md). It honours the
    # proxy variables as httpx does.
    common["http_client"] = http_client or openai.DefaultAioHttpClient(
        timeout=settings.timeout_seconds, limits=httpx2.Limits(max_connections=1000))
    if settings.provider is ModelProvider.AZURE and settings.azure_endpoint:
        if settings.api_key:
            common["api_key"] = settings.api_key
        else:
            common["azure_ad_token_provider"] = _entra_token_provider(settings, credential)
        return openai.AsyncAzureOpenAI(azure_endpoint=settings.azure_endpoint,
                                       azure_deployment=settings.model,
                                       api_version=settings.api_version, **common)
    if settings.provider is ModelProvider.OFFLINE:
        return openai.AsyncOpenAI(api_key="offline", base_url="http://offline.invalid/v1", **common)
    return openai.AsyncOpenAI(api_key=settings.api_key or "not-needed", base_url=settings.base_url,
                              **common)


def _entra_token_provider(settings: ModelSettings, credential: Any | None) -> Any:
    from azure.identity.aio import DefaultAzureCredential, get_bearer_token_provider

    if credential is None:
        credential = DefaultAzureCredential(
            managed_identity_client_id=settings.managed_identity_client_id)
    return get_bearer_token_provider(credential, AZURE_OPENAI_SCOPE)
