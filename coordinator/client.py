"""Python client of layerline's public API (sync and asyncio).

Owns: building GenerateRequests from keyword arguments and calling the Coordinator
service, with the API key (`api_key=`, else $LAYERLINE_API_KEY) on every call. Errors
surface as grpc.RpcError with the server's status code and message.

Does not own: the server side (service) or the terminal flow around it (cli).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence

from coordinator.api_keys import bearer_metadata
from protos import coordinator_pb2, coordinator_pb2_grpc
from protos.tls import TlsFiles, open_channel


def build_request(*, prompt: str = "", messages: Sequence[dict[str, str]] | None = None,
                  token_ids: Sequence[int] | None = None, max_new_tokens: int = 0, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 0.0, seed: int | None = None,
                  stop: Sequence[str] = (), ignore_eos: bool = False) -> coordinator_pb2.GenerateRequest:
    """A GenerateRequest from plain Python values (unset values take the server defaults)."""
    request = coordinator_pb2.GenerateRequest(
        prompt=prompt, token_ids=list(token_ids or []), max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, stop=list(stop), ignore_eos=ignore_eos,
        messages=[coordinator_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages or []])
    if seed is not None:
        request.seed = seed
    return request


class CoordinatorClient:
    """Blocking client. `tls`: connect over TLS (protos.tls.TlsFiles: the CA the server's certificate
    is checked against, and a client certificate for a server that requires one); None: plaintext.
    Example:

        >>> with CoordinatorClient("127.0.0.1:50050") as client:  # doctest: +SKIP
        ...     print(client.generate(prompt="Hello", max_new_tokens=8).text)
        >>> tls = TlsFiles.read(ca="certs/ca.pem", cert="certs/client.pem", key="certs/client-key.pem")
        >>> with CoordinatorClient("node1:50050", tls=tls) as client:  # doctest: +SKIP
        ...     print(client.model_info().model_name)
    """

    def __init__(self, address: str, *, timeout_s: float | None = None, api_key: str | None = None,
                 tls: TlsFiles | None = None) -> None:
        self.metadata = bearer_metadata(api_key)
        self.channel = open_channel(address, tls)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self.timeout_s = timeout_s

    def generate(self, **kwargs) -> coordinator_pb2.GenerateResponse:
        return self.stub.Generate(build_request(**kwargs), timeout=self.timeout_s, metadata=self.metadata)

    def generate_stream(self, **kwargs) -> Iterator[coordinator_pb2.GenerateStreamResponse]:
        return self.stub.GenerateStream(build_request(**kwargs), timeout=self.timeout_s, metadata=self.metadata)

    def model_info(self) -> coordinator_pb2.ModelInfo:
        return self.stub.GetModelInfo(coordinator_pb2.GetModelInfoRequest(), timeout=self.timeout_s,
                                      metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncCoordinatorClient:
    """asyncio client with the same methods and arguments as CoordinatorClient."""

    def __init__(self, address: str, *, timeout_s: float | None = None, api_key: str | None = None,
                 tls: TlsFiles | None = None) -> None:
        self.metadata = bearer_metadata(api_key)
        self.channel = open_channel(address, tls, aio=True)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self.timeout_s = timeout_s

    async def generate(self, **kwargs) -> coordinator_pb2.GenerateResponse:
        return await self.stub.Generate(build_request(**kwargs), timeout=self.timeout_s, metadata=self.metadata)

    async def generate_stream(self, **kwargs) -> AsyncIterator[coordinator_pb2.GenerateStreamResponse]:
        async for message in self.stub.GenerateStream(build_request(**kwargs), timeout=self.timeout_s,
                                                      metadata=self.metadata):
            yield message

    async def model_info(self) -> coordinator_pb2.ModelInfo:
        return await self.stub.GetModelInfo(coordinator_pb2.GetModelInfoRequest(), timeout=self.timeout_s,
                                            metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncCoordinatorClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
