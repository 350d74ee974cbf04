"""The Functions host's gRPC messages, as plain Python objects, for driving azure-functions-runtime.

In Azure the Python proxy worker hands the library worker (`azure_functions_runtime`) the protobuf
module generated from the host's `FunctionRpc.proto` as `request.properties["protos"]`; the library
reads requests and builds responses only through it. No pinned package ships that generated module
(protobuf is a dev extra of the runtime), so the dev host passes this one: each message is a class
whose fields default as proto3's do (empty string, 0, empty map or list; an unset message field
reads as an empty message where the runtime reads one unchecked, else `None`), `TypedData` keeps
its `data` oneof (`WhichOneof`), and the enums carry the proto's numbers.
Only the messages and fields the pinned runtime touches are here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar


class Message:
    """A proto3 message: keyword fields, the rest at their defaults."""

    FIELDS: ClassVar[dict[str, Any]] = {}

    def __init__(self, **fields: Any) -> None:
        unknown = set(fields) - set(self.FIELDS)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(unknown)}")
        for name, default in self.FIELDS.items():
            value = fields.get(name)
            if value is None:
                value = default() if callable(default) else default
            setattr(self, name, value)

    if TYPE_CHECKING:  # fields are set from FIELDS at run time
        def __getattr__(self, name: str) -> Any: ...

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.FIELDS
                          if getattr(self, name) not in (None, "", 0, {}, [], False))
        return f"{type(self).__name__}({shown})"


class TypedData(Message):
    """One value of a binding: exactly one of the `data` oneof's fields is set (or none)."""

    ONEOF: ClassVar[tuple[str, ...]] = (
        "string", "json", "bytes", "stream", "http", "int", "double", "collection_bytes",
        "collection_string", "collection_double", "collection_sint64", "model_binding_data",
        "collection_model_binding_data")
    FIELDS: ClassVar[dict[str, Any]] = dict.fromkeys(ONEOF)

    def __init__(self, **fields: Any) -> None:
        set_fields = [name for name, value in fields.items() if value is not None]
        if len(set_fields) > 1:
            raise TypeError(f"TypedData.data is a oneof; got {set_fields}")
        super().__init__(**fields)
        self._which = set_fields[0] if set_fields else None

    def WhichOneof(self, group: str) -> str | None:  # protobuf's name
        if group != "data":
            raise ValueError(f"TypedData has no oneof {group!r}")
        return self._which


class RpcHttpCookie(Message):
    class SameSite:
        Lax = 1
        Strict = 2
        ExplicitNone = 3

    FIELDS: ClassVar[dict[str, Any]] = dict.fromkeys(
        ("name", "value", "domain", "path", "expires", "secure", "http_only", "same_site", "max_age"))


setattr(RpcHttpCookie.SameSite, "None", 0)  # `None` is a Python keyword, so set by name as protobuf does


class RpcHttp(Message):
    FIELDS: ClassVar[dict[str, Any]] = {
        "method": "", "url": "", "headers": dict, "body": TypedData, "params": dict, "status_code": "",
        "query": dict, "enable_content_negotiation": False, "raw_body": TypedData, "identities": list,
        "cookies": list, "nullable_headers": dict, "nullable_params": dict, "nullable_query": dict}


class NullableString(Message):
    FIELDS: ClassVar[dict[str, Any]] = {"value": ""}


class NullableBool(Message):
    FIELDS: ClassVar[dict[str, Any]] = {"value": False}


class NullableDouble(Message):
    FIELDS: ClassVar[dict[str, Any]] = {"value": 0.0}


class Timestamp(Message):
    FIELDS: ClassVar[dict[str, Any]] = {"seconds": 0, "nanos": 0}


class NullableTimestamp(Message):
    FIELDS: ClassVar[dict[str, Any]] = {"value": None}


class BindingInfo(Message):
    # Direction
    out = 1
    inout = 2
    # DataType
    undefined = 0
    string = 1
    binary = 2
    stream = 3
    FIELDS: ClassVar[dict[str, Any]] = {"type": "", "direction": 0, "data_type": 0, "properties": dict}


setattr(BindingInfo, "in", 0)


class RpcRetryOptions(Message):
    FIELDS: ClassVar[dict[str, Any]] = dict.fromkeys(
        ("max_retry_count", "delay_interval", "minimum_interval", "maximum_interval", "retry_strategy"))


class RpcFunctionMetadata(Message):
    FIELDS: ClassVar[dict[str, Any]] = {
        "name": "", "directory": "", "script_file": "", "entry_point": "", "bindings": dict,
        "is_proxy": False, "status": None, "language": "", "raw_bindings": list, "function_id": "",
        "managed_dependency_enabled": False, "retry_options": None, "properties": dict}


class RpcException(Message):
    FIELDS: ClassVar[dict[str, Any]] = {"source": "", "stack_trace": "", "message": "",
                                        "is_user_exception": False, "type": ""}


class StatusResult(Message):
    Failure = 0
    Success = 1
    Cancelled = 2
    FIELDS: ClassVar[dict[str, Any]] = {"status": 0, "result": "", "exception": None, "logs": list}


class WorkerMetadata(Message):
    FIELDS: ClassVar[dict[str, Any]] = {"runtime_name": "", "runtime_version": "", "worker_version": "",
                                        "worker_bitness": "", "custom_properties": dict}


class WorkerInitResponse(Message):
    FIELDS: ClassVar[dict[str, Any]] = {"worker_version": "", "capabilities": dict, "result": None,
                                        "worker_metadata": None}


class FunctionMetadataResponse(Message):
    FIELDS: ClassVar[dict[str, Any]] = {"function_metadata_results": list, "result": None,
                                        "use_default_metadata_indexing": False}


class FunctionLoadResponse(Message):
    FIELDS: ClassVar[dict[str, Any]] = {"function_id": "", "result": None, "is_dependency_downloaded": False}


class FunctionEnvironmentReloadResponse(Message):
    FIELDS: ClassVar[dict[str, Any]] = {"worker_metadata": None, "capabilities": dict, "result": None}


class ParameterBinding(Message):
    FIELDS: ClassVar[dict[str, Any]] = {"name": "", "data": None, "rpc_shared_memory": None}

    def WhichOneof(self, group: str) -> str | None:  # protobuf's name
        if group != "rpc_data":
            raise ValueError(f"ParameterBinding has no oneof {group!r}")
        return "data" if self.data is not None else (
            "rpc_shared_memory" if self.rpc_shared_memory is not None else None)


class InvocationResponse(Message):
    FIELDS: ClassVar[dict[str, Any]] = {"invocation_id": "", "output_data": list, "return_value": None,
                                        "result": None}


# -- what the host sends (the worker only reads these) ----------------------------------------------


class RpcTraceContext(Message):
    FIELDS: ClassVar[dict[str, Any]] = {"trace_parent": "", "trace_state": "", "attributes": dict}


class RetryContext(Message):
    FIELDS: ClassVar[dict[str, Any]] = {"retry_count": 0, "max_retry_count": 0, "exception": None}


class InvocationRequest(Message):
    FIELDS: ClassVar[dict[str, Any]] = {
        "invocation_id": "", "function_id": "", "input_data": list, "trigger_metadata": dict,
        "trace_context": RpcTraceContext, "retry_context": RetryContext}


class WorkerInitRequest(Message):
    FIELDS: ClassVar[dict[str, Any]] = {"host_version": "", "capabilities": dict, "log_categories": dict,
                                        "worker_directory": "", "function_app_directory": ""}


class FunctionsMetadataRequest(Message):
    FIELDS: ClassVar[dict[str, Any]] = {"function_app_directory": ""}


class StreamingMessage(Message):
    """The envelope: one of its request fields is set."""

    FIELDS: ClassVar[dict[str, Any]] = dict.fromkeys(
        ("request_id", "worker_init_request", "functions_metadata_request", "invocation_request",
         "function_load_request", "function_environment_reload_request"))


class WorkerRequest(Message):
    """What the proxy worker passes to each library handler: the message and its properties."""

    FIELDS: ClassVar[dict[str, Any]] = {"request": None, "properties": dict}
