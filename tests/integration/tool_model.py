"""The real model client, over the openai SDK, pointed at the model stand-in."""

from __future__ import annotations

from devtools.fake_model import FakeModelServer
from shared.model import ChatModel, build_model
from shared.settings import load_settings


def model_for(server: FakeModelServer) -> ChatModel:
    return build_model(load_settings({"OPENAI_BASE_URL": server.base_url,
                                      "OPENAI_MODEL": "tool-model"}).model)
