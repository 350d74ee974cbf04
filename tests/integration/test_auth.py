"""Inbound auth against a real local identity provider over HTTP: signing-key fetches and trust.

The webhook tests (test_webhook.py) run the same code through the app; these reach the corners
(slow, malformed and trickling key documents) without starting a host for each.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest

from devtools.fake_channel import FakeIdentity
from shared.activity import Activity, parse_activity
from shared.auth import BotAuthenticator, OpenIdKeys, is_loopback_url, service_url_allowed
from shared.errors import AuthUnavailable, Unauthorized
from shared.settings import load_settings
from tests.e2e.channel import CLIENT_ID, event


@pytest.fixture
async def identity() -> AsyncIterator[FakeIdentity]:
    async with FakeIdentity() as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(10.0)) as client:
        yield client


def activity(service_url: str = "https://smba.trafficmanager.net/amer/") -> Activity:
    data = event("message", text="hi", id="a-1", conversation_id="c-1", serviceUrl=service_url)
    return parse_activity(json.dumps(data).encode(), {"Content-Type": "application/json"})


def authenticator(identity: FakeIdentity, http: httpx2.AsyncClient) -> BotAuthenticator:
    settings = load_settings({"CLIENT_ID": CLIENT_ID,
                              "BOT_OPENID_METADATA_URL": identity.botframework_metadata_url})
    return BotAuthenticator(settings.bot, http=http, in_azure=False)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- the signing keys -------------------------------------------------------------------------


async def test_requests_during_the_first_key_fetch_wait_for_it_and_use_its_keys(
        identity: FakeIdentity, http: httpx2.AsyncClient) -> None:
    # GIVEN a new instance (no keys yet) and metadata that takes 0.5 s to answer
    identity.metadata_delay = 0.5
    keys = OpenIdKeys(identity.botframework_metadata_url, http=http)
    # WHEN ten requests need the key at once
    found = await asyncio.gather(*(keys.get("bf-key-1") for _ in range(10)))
    # THEN all ten got it, from one fetch
    assert all(key is not None for key in found)
    assert identity.metadata_requests == 1


async def test_ten_valid_tokens_at_once_on_a_new_instance_are_all_accepted(
        identity: FakeIdentity, http: httpx2.AsyncClient) -> None:
    # GIVEN a new instance whose first key fetch takes 0.5 s
    identity.metadata_delay = 0.5
    auth = authenticator(identity, http)
    incoming = activity()
    token = identity.botframework_token(audience=CLIENT_ID, service_url=incoming.service_url)
    # WHEN ten valid requests arrive at once
    results = await asyncio.gather(*(auth.authenticate(bearer(token), incoming) for _ in range(10)),
                                   return_exceptions=True)
    # THEN none is refused
    assert [getattr(r, "source", r) for r in results] == ["botframework"] * 10


MALFORMED = {
    "metadata not JSON": {"metadata_body": b"<html>oops</html>"},
    "metadata a list": {"metadata_body": b"[1, 2]"},
    "metadata a string": {"metadata_body": b'"jwks"'},
    "no jwks_uri": {"metadata_body": b"{}"},
    "jwks_uri a number": {"metadata_body": b'{"jwks_uri": 5}'},
    "jwks_uri not a URL": {"metadata_body": b'{"jwks_uri": "https://"}'},
    "keys not JSON": {"keys_body": b"not json"},
    "keys a list": {"keys_body": b"[]"},
    "keys not a list": {"keys_body": b'{"keys": 5}'},
    "keys of odd shapes": {"keys_body": b'{"keys": [5, "x", null, {"kid": 7}]}'},
    "a key that does not parse": {"keys_body": b'{"keys": [{"kid": "k", "kty": "RSA", "n": "!!", "e": 1}]}'},
    "no keys": {"keys_body": b'{"keys": []}'},
}


@pytest.mark.parametrize("fault", list(MALFORMED))
async def test_a_malformed_key_document_makes_auth_unavailable_not_a_500(
        identity: FakeIdentity, http: httpx2.AsyncClient, fault: str) -> None:
    # GIVEN an identity provider serving a malformed metadata or JWKS document
    for name, body in MALFORMED[fault].items():
        setattr(identity, name, body)
    keys = OpenIdKeys(identity.botframework_metadata_url, http=http)
    # WHEN a request needs a key THEN keys are unavailable (503), not an unplanned error (500)
    # nor an unknown key (401, which a channel does not retry)
    with pytest.raises(AuthUnavailable):
        await keys.get("bf-key-1")


async def test_a_trickling_metadata_server_is_cut_off_by_the_total_deadline(
        identity: FakeIdentity, http: httpx2.AsyncClient) -> None:
    # GIVEN metadata sent one byte every 0.3 s (about 50 s in all; each read is well within the
    # client's 10 s read timeout) and a key fetch deadline of 1 s
    identity.trickle_seconds = 0.3
    keys = OpenIdKeys(identity.botframework_metadata_url, http=http, deadline_seconds=1.0)
    # WHEN a request needs a key THEN it is refused as unavailable, long before the bytes end
    async with asyncio.timeout(15):
        with pytest.raises(AuthUnavailable):
            await keys.get("bf-key-1")


async def test_a_good_document_after_a_bad_one_is_used(
        identity: FakeIdentity, http: httpx2.AsyncClient) -> None:
    # GIVEN a first fetch that failed
    identity.keys_body = b"[]"
    keys = OpenIdKeys(identity.botframework_metadata_url, http=http)
    with pytest.raises(AuthUnavailable):
        await keys.get("bf-key-1")
    # WHEN the identity provider recovers and a request comes a second later
    identity.keys_body = None
    await asyncio.sleep(1.05)
    # THEN the keys are fetched again and used
    assert await keys.get("bf-key-1") is not None


@pytest.mark.parametrize("endorsements", ["msteams-and-more", 5, None, [5, None]])
async def test_endorsements_that_are_not_a_list_of_channels_endorse_nothing(
        identity: FakeIdentity, http: httpx2.AsyncClient, endorsements: Any) -> None:
    # GIVEN a key whose endorsements are malformed (a string used to match as a substring)
    identity.endorsements = endorsements
    auth = authenticator(identity, http)
    incoming = activity()
    token = identity.botframework_token(audience=CLIENT_ID, service_url=incoming.service_url)
    # WHEN a msteams activity signed with it arrives THEN the channel is not endorsed (401)
    with pytest.raises(Unauthorized) as refused:
        await auth.authenticate(bearer(token), incoming)
    assert refused.value.code == "channel_not_endorsed"


async def test_the_claims_of_a_passed_token_are_the_tokens_own(
        identity: FakeIdentity, http: httpx2.AsyncClient) -> None:
    # GIVEN a valid Bot Framework token
    incoming = activity()
    token = identity.botframework_token(audience=CLIENT_ID, service_url=incoming.service_url)
    # WHEN it passes THEN its claims carry nothing of ours (no smuggled endorsements)
    result = await authenticator(identity, http).authenticate(bearer(token), incoming)
    assert set(result.claims) == {"iss", "aud", "iat", "nbf", "exp", "serviceurl"}


# -- where replies may go ---------------------------------------------------------------------

PUBLIC = load_settings({}).bot.service_url_hosts


@pytest.mark.parametrize("url", [
    "https://smba.trafficmanager.net/amer/", "https://smba.trafficmanager.net/teams/",
    "https://SMBA.trafficmanager.net:443/emea/", "https://smba.infra.gcc.teams.microsoft.com/gcc",
    "https://webchat.botframework.com/", "https://directline.botframework.com/",
    "https://europe.webchat.botframework.com/",
])
def test_the_public_clouds_connector_hosts_are_allowed_by_default(url: str) -> None:
    assert service_url_allowed(url, PUBLIC)


@pytest.mark.parametrize("url", [
    "https://attacker.example.com/", "http://smba.trafficmanager.net/amer/",
    "https://evil-smba.trafficmanager.net/", "https://smba.trafficmanager.net.evil.com/",
    "https://botframework.com.evil.com/", "https://notbotframework.com/",
    "https://.botframework.com/", "https://webchat..botframework.com/",
    "https://evil.com\\@smba.trafficmanager.net/", "https://user@smba.trafficmanager.net/",
    "https://smba.trafficmanager.net:99999/", "https://[::1/", "smba.trafficmanager.net/amer",
    "ftp://smba.trafficmanager.net/", "https://smba.trafficmanager.net /", "",
    "https://smba.infra.gov.teams.microsoft.us/teams",
])
def test_other_hosts_schemes_and_malformed_urls_are_not(url: str) -> None:
    assert not service_url_allowed(url, PUBLIC)


def test_a_listed_loopback_host_may_use_http_for_tests() -> None:
    assert service_url_allowed("http://127.0.0.1:5000/", ("127.0.0.1",))
    assert not service_url_allowed("http://127.0.0.1:5000/", PUBLIC)
    assert not service_url_allowed("http://10.0.0.1:5000/", ("10.0.0.1",))


@pytest.mark.parametrize(("url", "loopback"), [
    ("http://127.0.0.1:5000/", True), ("http://localhost/", True), ("http://[::1]:80/", True),
    ("http://[::1/", False), ("http://127.0.0.1:99999/", False), ("http://127.0.0.1:port/", False),
    ("https://smba.trafficmanager.net/", False), ("not a url", False),
])
def test_loopback_means_a_well_formed_url_of_this_machine(url: str, loopback: bool) -> None:
    assert is_loopback_url(url) is loopback
