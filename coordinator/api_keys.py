"""API keys on the public API: the key file, its reload on SIGHUP, and the server interceptor.

Owns: reading and checking the key file (`--api-keys FILE`), the live set of keys (swapped whole
on SIGHUP; a file that fails to read keeps the keys already loaded), checking the
`authorization: Bearer KEY` metadata of every call in constant time (`UNAUTHENTICATED` when it is
missing or wrong; health stays open for probes), each key's bound on concurrent requests
(`RESOURCE_EXHAUSTED` beyond it), the metadata a client sends, and the command-line flags of both
sides. A key is never logged and never put in a status message.

Key file: one key per line; blank lines and `#` comments are skipped, surrounding whitespace is
stripped. A key is 16 to 512 characters of `A-Z a-z 0-9 - . _ ~ + / =` (a bearer token), and may
be followed on its line by `max_concurrent=N`, the most requests it may have running at once:

    # alice: no limit
    k3Jp0Vd2Q9mX7sLr4tYw8bN1
    # batch jobs: at most 4 at once
    Zq8Rr2mW5nB0xT6yLp3cV9hK max_concurrent=4

Does not own: TLS (channel credentials), the services behind the interceptor, or the client calls
themselves (coordinator/client.py adds the metadata built here).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import re
import signal
import threading
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

ENV_VAR = "LAYERLINE_API_KEY"
MAX_FILE_BYTES = 1 << 20
KEY_PATTERN = re.compile(r"[A-Za-z0-9\-._~+/=]{16,512}")
KEY_RULE = "16 to 512 characters of A-Z a-z 0-9 - . _ ~ + / ="
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)  # Kubernetes probes carry no key
UNCOUNTED_PREFIXES = ("/grpc.reflection.",)  # grpcurl keeps its reflection stream open during the call
MISSING = "this server needs an API key: send the metadata 'authorization: Bearer KEY'"
MALFORMED = "the authorization metadata must be one value 'Bearer KEY'"
WRONG = "the API key is not valid"


class KeyFileError(ValueError):
    """The key file cannot be used; the message names the file and line, never a key."""


def _digest(key: str) -> bytes:
    # Keys are compared as fixed-length digests, so neither their length nor their text shows in timing.
    return hashlib.sha256(key.encode("ascii")).digest()


def parse_key_file(text: str, source: str) -> tuple[dict[bytes, int], str]:
    """{key digest: max concurrent (0 = unbounded)} and the first key, from a key file's text."""
    limits: dict[bytes, int] = {}
    first_line: dict[bytes, int] = {}
    first_key = ""
    for number, line in enumerate(text.splitlines(), start=1):
        fields = _fields(line)
        if not fields:
            continue
        key, options = fields[0], fields[1:]
        if not KEY_PATTERN.fullmatch(key):
            raise KeyFileError(f"{source} line {number}: a key is {KEY_RULE}")
        limit = 0
        for option in options:
            name, _, value = option.partition("=")
            if name != "max_concurrent" or not value.isdigit() or int(value) < 1:
                raise KeyFileError(f"{source} line {number}: after the key only max_concurrent=N (N >= 1) "
                                   "may follow")
            limit = int(value)
        digest = _digest(key)
        if digest in limits:
            raise KeyFileError(f"{source} line {number}: the key of line {first_line[digest]} again")
        limits[digest], first_line[digest] = limit, number
        first_key = first_key or key
    if not limits:
        raise KeyFileError(f"{source} holds no API key: write one key per line")
    return limits, first_key


def _fields(line: str) -> list[str]:
    """A line's words up to a `#` that starts a word (a trailing comment)."""
    words = []
    for word in line.split():
        if word.startswith("#"):
            break
        words.append(word)
    return words


def read_key_file(path: str | Path) -> tuple[dict[bytes, int], str]:
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise KeyFileError(f"cannot read the API key file {path}: {err.strerror or err}") from None
    if len(data) > MAX_FILE_BYTES:
        raise KeyFileError(f"the API key file {path} is larger than {MAX_FILE_BYTES >> 20} MiB")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"the API key file {path} is not ASCII text; keys are {KEY_RULE}") from None
    return parse_key_file(text, str(path))


class ApiKeys:
    """The keys the server accepts now and the requests each key has running."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._limits, self._first_key = read_key_file(self.path)
        self._running: dict[bytes, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._limits)

    def own_key(self) -> str:
        """A key of the file, for a client inside this process (launch-local's one-shot answer)."""
        return self._first_key

    def reload(self) -> bool:
        """Read the file again; on failure keep the keys loaded and log one line."""
        try:
            limits, first_key = read_key_file(self.path)
        except KeyFileError as err:
            log.error("API keys not reloaded, %d kept: %s", len(self._limits), err)
            return False
        with self._lock:
            self._limits, self._first_key = limits, first_key
        log.warning("API keys reloaded from %s: %d key(s)", self.path, len(limits))
        return True

    def authenticate(self, values: list[str]) -> tuple[bytes | None, str]:
        """(digest of the matching key, "") or (None, why) from the call's authorization values."""
        if not values:
            return None, MISSING
        scheme, _, key = values[0].strip().partition(" ")
        if len(values) != 1 or scheme.lower() != "bearer" or not key.strip():
            return None, MALFORMED
        try:
            presented = _digest(key.strip())
        except UnicodeEncodeError:
            return None, WRONG
        match = None
        for digest in self._limits:  # every key is compared: no early exit to time
            if hmac.compare_digest(presented, digest):
                match = digest
        return (match, "") if match is not None else (None, WRONG)

    def acquire(self, digest: bytes) -> tuple[grpc.StatusCode, str] | None:
        """Count one more running request of the key; the refusal (code, message) when it may not run."""
        with self._lock:
            limit = self._limits.get(digest)
            if limit is None:  # the key left the file since the call was authenticated
                return grpc.StatusCode.UNAUTHENTICATED, WRONG
            running = self._running.get(digest, 0)
            if limit and running >= limit:
                return (grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"this API key has {running} requests running, its max_concurrent; retry when one ends")
            self._running[digest] = running + 1
        return None

    def release(self, digest: bytes) -> None:
        with self._lock:
            running = self._running.get(digest, 0) - 1
            if running > 0:
                self._running[digest] = running
            else:
                self._running.pop(digest, None)

    def running(self) -> int:
        """Requests running over all keys (tests read it)."""
        with self._lock:
            return sum(self._running.values())


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Lets a call through only with a valid key, counted against that key's limit while it runs."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        values = [value for name, value in handler_call_details.invocation_metadata or ()
                  if name == "authorization" and isinstance(value, str)]
        digest, why = self.keys.authenticate(values)
        if digest is None:
            return _refusal(method, why)
        if method.startswith(UNCOUNTED_PREFIXES):
            return handler
        return _counted(handler, self.keys, digest)


def _refusal(method: str, message: str) -> grpc.RpcMethodHandler:
    """A handler that answers UNAUTHENTICATED without reading, let alone parsing, the request."""
    def refuse(request_iterator, context):
        log.info("refused %s from %s: %s", method, context.peer(), message)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.stream_stream_rpc_method_handler(refuse)


def _counted(handler: grpc.RpcMethodHandler, keys: ApiKeys, digest: bytes) -> grpc.RpcMethodHandler:
    """The same handler, holding one of the key's request slots from its start until the call ends
    in any way: returned, raised, cancelled, or past its deadline (the termination callback)."""
    def admit(context):
        refusal = keys.acquire(digest)
        if refusal is not None:
            context.abort(*refusal)
        lock, held = threading.Lock(), [True]

        def release() -> None:
            with lock:
                if not held[0]:
                    return
                held[0] = False
            keys.release(digest)

        context.add_callback(release)
        return release

    def unary(behaviour):
        def run(request, context):
            release = admit(context)
            try:
                return behaviour(request, context)
            finally:
                release()
        return run

    def streaming(behaviour):
        def run(request, context):
            release = admit(context)
            try:
                yield from behaviour(request, context)
            finally:
                release()
        return run

    codecs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **codecs)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **codecs)


def reload_on_sighup(keys: ApiKeys | None) -> None:
    """Re-read the key file on every SIGHUP (call from the main thread; nothing without keys).
    The signal handler only wakes a thread, which reads and logs outside the signal's context."""
    if keys is None:
        return
    wake = threading.Event()

    def watch() -> None:
        while True:
            wake.wait()
            wake.clear()
            keys.reload()

    threading.Thread(target=watch, name="api-keys-reload", daemon=True).start()
    signal.signal(signal.SIGHUP, lambda *_: wake.set())


# ---- clients -----------------------------------------------------------------------------------

def bearer_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    """The metadata carrying `api_key`, or $LAYERLINE_API_KEY when it is None; None without a key."""
    key = (os.environ.get(ENV_VAR, "") if api_key is None else api_key).strip()
    if not key:
        return None
    if not KEY_PATTERN.fullmatch(key):
        raise ValueError(f"the API key (--api-key or ${ENV_VAR}) must be {KEY_RULE}")
    return (("authorization", f"Bearer {key}"),)


# ---- command line ------------------------------------------------------------------------------

def add_api_keys_argument(parser: argparse.ArgumentParser) -> None:
    """`--api-keys FILE` for the commands that serve the public API."""
    parser.add_argument("--api-keys", metavar="FILE",
                        help="accept only calls with 'authorization: Bearer KEY' metadata naming a key of FILE "
                             "(one per line, optionally 'KEY max_concurrent=N'); re-read on SIGHUP; health "
                             "stays open (default: no keys)")


def add_api_key_argument(parser: argparse.ArgumentParser) -> None:
    """`--api-key KEY` for the commands that call the public API."""
    parser.add_argument("--api-key", metavar="KEY",
                        help=f"the key to send when the coordinator has --api-keys (default ${ENV_VAR}, "
                             "which keeps the key out of the process list)")


def api_keys_from_args(args: argparse.Namespace) -> ApiKeys | None:
    """The keys of --api-keys, read now so a bad file stops the command before anything starts."""
    path = getattr(args, "api_keys", None)
    return ApiKeys(path) if path else None
