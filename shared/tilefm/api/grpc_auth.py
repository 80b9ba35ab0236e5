"""Authentication of the gRPC job API with the HTTP API's keys and scopes (`tilefm.api.auth.KeyRing`),
presented as call metadata `authorization: Bearer KEY` or `x-api-key: KEY`.

| method                          | scope      |
| ------------------------------- | ---------- |
| Get, List, Watch                | jobs:read  |
| Submit, Cancel                  | jobs:write |
| anything else                   | jobs:write |

No key or an unknown one is UNAUTHENTICATED, a key without the scope PERMISSION_DENIED; the check
runs before the request is parsed or the servicer sees it, for unary and streaming calls alike.
With `auth_disabled` every call passes, as over HTTP.

    server = grpc.server(pool, interceptors=[AuthInterceptor(KeyRing(settings))])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from tilefm.api.auth import READ, WRITE, Forbidden, KeyRing, Unauthenticated, key_from

_SERVICE = "/tilefm.v1.JobService/"

#: the scope each method needs; a method not listed needs WRITE, so none is open by omission
SCOPES: dict[str, str] = {
    _SERVICE + "Get": READ,
    _SERVICE + "List": READ,
    _SERVICE + "Watch": READ,
    _SERVICE + "Submit": WRITE,
    _SERVICE + "Cancel": WRITE,
}

_HANDLER_KINDS: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def method_handler_like(
    handler: grpc.RpcMethodHandler[Any, Any] | None,
    behavior: Callable[[Any, grpc.ServicerContext], Any],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """A method handler of `handler`'s kind (unary or streaming, each way) running `behavior`.

    Args:
        handler: the handler whose kind and response serializer to keep (None: unary-unary).
        behavior: what runs for a call, `behavior(request, context)`.
        request_deserializer: how requests are parsed (None: they stay bytes).

    Returns:
        The new handler.
    """
    kind = (handler.request_streaming, handler.response_streaming) if handler is not None else (False, False)
    serializer = handler.response_serializer if handler is not None else None
    return _HANDLER_KINDS[kind](
        behavior, request_deserializer=request_deserializer, response_serializer=serializer
    )


def _refusal(
    handler: grpc.RpcMethodHandler[Any, Any] | None, code: grpc.StatusCode, details: str
) -> grpc.RpcMethodHandler[Any, Any]:
    def refuse(_request: Any, context: grpc.ServicerContext) -> None:
        context.abort(code, details)

    return method_handler_like(handler, refuse)


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls whose metadata carries no key of `keyring` with the method's scope."""

    def __init__(self, keyring: KeyRing, scopes: dict[str, str] | None = None):
        self.keyring = keyring
        self.scopes = SCOPES if scopes is None else scopes

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        scope = self.scopes.get(handler_call_details.method, WRITE)
        metadata = {
            k.lower(): v for k, v in handler_call_details.invocation_metadata or () if isinstance(v, str)
        }
        try:
            self.keyring.authorize(key_from(metadata.get("authorization"), metadata.get("x-api-key")), scope)
        except Unauthenticated as e:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, str(e))
        except Forbidden as e:
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED, str(e))
        return handler
