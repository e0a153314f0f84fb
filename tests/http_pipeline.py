"""The HTTP API's test pipeline: a keyed coordinator over a tiny 2-stage Llama serving both APIs, and
the clients the tests call it with. Its model id is the one docs/api.md's examples name, so they
run with only the port changed.
"""

from __future__ import annotations

from types import SimpleNamespace

import openai
from conftest import running_coordinator, running_stages
from tiny_models import save_tiny_model, save_tiny_tokenizer
from transformers import AutoTokenizer

from coordinator.api_keys import ApiKeys
from coordinator.client import CoordinatorClient

KEY = "http-key-0123456789abcdef"
ONE_SLOT = "one-slot-key-0123456789AB"
MODEL = "smollm2-135m"  # the id the docs' examples send
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
TIMEOUT_S = 60


def serving(tmp_path_factory):
    """For a module-scoped fixture to yield from: a namespace of url (of the HTTP API), address (gRPC),
    stages (addresses), stage_servers, model_dir and server (the CoordinatorServer)."""
    directory = tmp_path_factory.mktemp("http-llama")
    save_tiny_model(directory, "llama")
    save_tiny_tokenizer(directory)
    keys = directory / "keys"
    keys.write_text(f"{KEY}\n{ONE_SLOT} max_concurrent=1\n")
    with running_stages(directory, 2) as (stages, stage_servers):
        with running_coordinator(directory, stages, api_keys=ApiKeys(keys), model_name=MODEL,
                                 http_port=0) as (address, server):
            yield SimpleNamespace(url=f"http://127.0.0.1:{server.http_server.port}", address=address, stages=stages,
                                  stage_servers=stage_servers, model_dir=directory, server=server)


def client(api, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=key, max_retries=0, timeout=TIMEOUT_S)


def grpc_reply(api, **kwargs):
    with CoordinatorClient(api.address, api_key=KEY, timeout_s=TIMEOUT_S) as grpc_client:
        return grpc_client.generate(**kwargs)


def decode(api, token_ids) -> str:
    return AutoTokenizer.from_pretrained(api.model_dir).decode(list(token_ids), skip_special_tokens=True)
