"""The model checked early, spending no tokens: what each answer means and what to fix.

The real openai SDK runs over an httpx MockTransport (no network)."""

from __future__ import annotations

import json

import httpx2
import pytest

from shared.errors import ModelMisconfigured, ModelUnavailable
from shared.model import ChatModel, ModelState, build_model
from shared.settings import load_settings

OPENAI = {"OPENAI_API_KEY": "sk-wrong", "OPENAI_MODEL": "gpt-4o-mini"}
AZURE = {"AZURE_OPENAI_ENDPOINT": "https://r.openai.azure.com", "AZURE_OPENAI_DEPLOYMENT": "chat",
         "AZURE_OPENAI_API_KEY": "k"}


def model_answering(env: dict[str, str], status: int,
                    seen: list[httpx2.Request] | None = None) -> ChatModel:
    def handler(request: httpx2.Request) -> httpx2.Response:
        (seen if seen is not None else []).append(request)
        if status == 200:
            return httpx2.Response(200, json={"id": "gpt-4o-mini", "object": "model"})
        return httpx2.Response(status, json={"error": {"message": f"status {status}", "code": None}})

    settings = load_settings({**env, "CHAT_MODEL_MAX_RETRIES": "0"}).model
    return build_model(settings, http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)))


@pytest.mark.parametrize(("env", "status", "state", "advice"), [
    (OPENAI, 401, ModelState.REFUSED, "check OPENAI_API_KEY"),
    (OPENAI, 403, ModelState.REFUSED, "check OPENAI_API_KEY and OPENAI_MODEL"),
    (OPENAI, 404, ModelState.MISSING, "check OPENAI_MODEL"),
    (AZURE, 401, ModelState.REFUSED, "check AZURE_OPENAI_API_KEY"),
    (AZURE, 403, ModelState.REFUSED, "Cognitive Services OpenAI User"),
    (AZURE, 404, ModelState.MISSING, "check AZURE_OPENAI_DEPLOYMENT"),
])
async def test_a_setup_problem_is_permanent_and_says_what_to_fix(
        env: dict[str, str], status: int, state: ModelState, advice: str) -> None:
    # GIVEN a model endpoint that answers 401, 403 or 404
    model = model_answering(env, status)
    # WHEN it is checked
    check = await model.check()
    # THEN the state is permanent and its one line names the setting to fix
    assert check.state is state and check.permanent
    assert check.detail.startswith(f"the model answered {status}: ") and advice in check.detail


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_a_busy_or_failing_endpoint_is_transient(status: int) -> None:
    # GIVEN an endpoint that answers 429 or 5xx
    check = await model_answering(OPENAI, status).check()
    # THEN it is unreachable for now, not a setup problem
    assert check.state is ModelState.UNREACHABLE and not check.permanent


async def test_the_check_spends_no_tokens() -> None:
    # GIVEN OpenAI, and Azure OpenAI whose deployment takes the key (400: no messages)
    seen: list[httpx2.Request] = []
    openai_check = await model_answering(OPENAI, 200, seen).check()
    azure_check = await model_answering(AZURE, 400, seen).check()
    # THEN both are OK: OpenAI was asked for the model, Azure for a completion of no messages
    assert openai_check.state is ModelState.OK and azure_check.state is ModelState.OK
    assert [(r.method, r.url.path) for r in seen] == [
        ("GET", "/v1/models/gpt-4o-mini"), ("POST", "/openai/deployments/chat/chat/completions")]
    assert json.loads(seen[1].content)["messages"] == []


async def test_a_failed_call_updates_the_known_state() -> None:
    # GIVEN a model whose key is refused
    model = model_answering(OPENAI, 401)
    # WHEN a turn's call fails
    with pytest.raises(ModelMisconfigured) as caught:
        await model.complete([{"role": "user", "content": "hi"}])
    # THEN the error is a setup problem naming the setting, and the known state says so
    assert caught.value.answered == 401 and "OPENAI_API_KEY" in str(caught.value)
    assert model.last_check.state is ModelState.REFUSED
    assert (await model.known_state()).state is ModelState.REFUSED  # no new check: permanent


async def test_an_unreachable_endpoint_is_checked_again() -> None:
    # GIVEN an endpoint that fails with a 503, then answers
    statuses = [503, 503, 200]

    def handler(request: httpx2.Request) -> httpx2.Response:
        status = statuses.pop(0)
        return httpx2.Response(status, json={"id": "m"} if status == 200 else {"error": {}})

    settings = load_settings({**OPENAI, "CHAT_MODEL_MAX_RETRIES": "0"}).model
    model = build_model(settings, http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)))
    with pytest.raises(ModelUnavailable):
        await model.complete([{"role": "user", "content": "hi"}])
    assert model.last_check.state is ModelState.UNREACHABLE
    # WHEN the known state is asked for twice
    # THEN a transient state is checked again each time, until it is OK
    assert (await model.known_state()).state is ModelState.UNREACHABLE
    assert (await model.known_state()).state is ModelState.OK


async def test_no_entra_id_token_for_azure_openai_is_a_setup_problem() -> None:
    # GIVEN Azure OpenAI with Entra ID and a credential that finds no token (no `az login`)
    from azure.core.exceptions import ClientAuthenticationError

    class NoToken:
        async def get_token(self, *scopes: str, **options: object) -> object:
            raise ClientAuthenticationError("no credential available")

        async def close(self) -> None: ...

    seen: list[httpx2.Request] = []
    settings = load_settings({**AZURE, "AZURE_OPENAI_API_KEY": ""}).model

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(400, json={"error": {}})

    model = build_model(settings, credential=NoToken(),
                        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)))
    # WHEN it is checked, and a turn calls it
    check = await model.check()
    with pytest.raises(ModelMisconfigured) as caught:
        await model.complete([{"role": "user", "content": "hi"}])
    # THEN both say it is a setup problem and what to do, and nothing was sent
    assert check.state is ModelState.REFUSED and "az login" in check.detail
    assert "AZURE_CLIENT_ID" in str(caught.value) and seen == []
