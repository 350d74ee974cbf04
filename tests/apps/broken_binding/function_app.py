"""A test-only function app with a binding mistake: the trigger is named `req`, the parameter `request`."""

from __future__ import annotations

import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)


@app.route(route="hello", methods=["GET"])
def hello(request: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("never served")
