"""The pinned azure-functions-runtime, driven in-process as the Python proxy worker drives it in Azure.

The Functions host talks to the Python worker over gRPC; on Python 3.13+ the proxy worker passes
each message to the library worker `azure_functions_runtime` (the version pinned in
requirements.txt, by runtime version control). This module makes the same calls in the same order
with the same messages (`devtools.rpc`): `worker_init_request` (imports the app and indexes it,
with the library's binding validation), `functions_metadata_request` (the functions and their raw
bindings, which the host reads its triggers from), then one `invocation_request` per run. So the
app is imported, validated, converted (`azure.functions` converters both ways) and called by the
library code that runs it in Azure.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import azure_functions_runtime as library  # type: ignore[import-untyped]

from devtools import rpc

#: What the host tells the worker it can do (the Python worker reads only this one).
HOST_CAPABILITIES: dict[str, str] = {}


class IndexingError(RuntimeError):
    """The worker could not load the app: the library's own message (it names the function)."""


@dataclass(frozen=True)
class IndexedFunction:
    """One function as the worker reported it to the host."""

    name: str
    function_id: str
    bindings: tuple[dict[str, Any], ...]

    @property
    def trigger(self) -> dict[str, Any]:
        return next(b for b in self.bindings if str(b.get("type", "")).endswith("Trigger"))


@dataclass(frozen=True)
class Outcome:
    """One invocation's result: the return value's and output bindings' TypedData, or the exception's
    message and trace."""

    succeeded: bool
    return_value: rpc.TypedData | None
    error: str = ""
    stack_trace: str = ""
    outputs: dict[str, rpc.TypedData] = field(default_factory=dict)


class Worker:
    """One function app in this process, loaded and invoked through azure_functions_runtime."""

    def __init__(self, *, app_directory: Path) -> None:
        self.app_directory = app_directory.resolve()
        self.functions: dict[str, IndexedFunction] = {}

    async def start(self) -> list[IndexedFunction]:
        """Import and index the app; `IndexingError` with the library's message when it cannot."""
        if str(self.app_directory) not in sys.path:
            sys.path.insert(0, str(self.app_directory))  # the proxy worker puts the app first
        library.start_threadpool_executor()
        init = await library.worker_init_request(self._request(worker_init_request=rpc.WorkerInitRequest(
            host_version="dev", capabilities=HOST_CAPABILITIES,
            function_app_directory=str(self.app_directory))))
        _raise_on_failure(init.result)
        metadata = await library.functions_metadata_request(self._request(
            functions_metadata_request=rpc.FunctionsMetadataRequest(
                function_app_directory=str(self.app_directory))))
        _raise_on_failure(metadata.result)
        if not metadata.function_metadata_results:
            script = os.environ.get("PYTHON_SCRIPT_FILE_NAME", "function_app.py")
            raise IndexingError(f"no functions found: {self.app_directory / script} is missing")
        for meta in metadata.function_metadata_results:
            bindings = tuple(json.loads(raw) for raw in meta.raw_bindings)
            self.functions[meta.name] = IndexedFunction(meta.name, meta.function_id, bindings)
        return list(self.functions.values())

    async def invoke(self, function: IndexedFunction, *, trigger: rpc.TypedData,
                     trigger_metadata: dict[str, rpc.TypedData] | None = None,
                     invocation_id: str | None = None) -> Outcome:
        """Run `function` once with its trigger's value (and the trigger's metadata, which converters such
        as the queue trigger's read), as the host's InvocationRequest does."""
        request = rpc.InvocationRequest(
            invocation_id=invocation_id or str(uuid.uuid4()), function_id=function.function_id,
            input_data=[rpc.ParameterBinding(name=function.trigger["name"], data=trigger)],
            trigger_metadata=trigger_metadata)
        response = await library.invocation_request(self._request(invocation_request=request))
        if response.result.status == rpc.StatusResult.Success:
            return Outcome(succeeded=True, return_value=response.return_value,
                           outputs={binding.name: binding.data for binding in response.output_data})
        exception = response.result.exception
        return Outcome(succeeded=False, return_value=None, error=exception.message,
                       stack_trace=exception.stack_trace)

    def close(self) -> None:
        library.stop_threadpool_executor()

    @staticmethod
    def _request(**message: Any) -> rpc.WorkerRequest:
        return rpc.WorkerRequest(request=rpc.StreamingMessage(request_id=str(uuid.uuid4()), **message),
                                 properties={"host": "127.0.0.1", "protos": rpc})


def _raise_on_failure(result: rpc.StatusResult) -> None:
    if result.status != rpc.StatusResult.Success:
        raise IndexingError(result.exception.message if result.exception else "the worker failed to start")
