"""Requests that do not parse get INVALID_ARGUMENT with one line saying so, on every RPC and both
transports, without a traceback in the logs; and a server's shutdown has an end."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time

import grpc
import pytest
from test_bad_input import valid_prefill
from waiting import stage_sessions

from protos import coordinator_pb2, stage_pb2, unix_socket
from protos.shutdown import stop_server

SERVICES = [stage_pb2.DESCRIPTOR.services_by_name["Stage"], coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"]]
METHODS = [method for service in SERVICES for method in service.methods]
UNPARSEABLE = b"\x0f\x01\x02"  # field 1 with wire type 7: no message has it


def _call(channel: grpc.Channel, method, payloads: list[bytes]) -> list[bytes]:
    """A call of `method` with raw request bytes; the raw answers. Raises grpc.RpcError."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    kinds = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
             (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    call = kinds[method.client_streaming, method.server_streaming](path, request_serializer=None,
                                                                     response_deserializer=None)
    answers = call(iter(payloads) if method.client_streaming else payloads[0], timeout=30)
    return list(answers) if method.server_streaming else [answers]


def _address(tiny_api, method) -> str:
    return tiny_api[0] if method.containing_service.name == "Coordinator" else tiny_api[1][0]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.containing_service.name}.{m.name}")
def test_every_rpc_answers_invalid_argument_to_bytes_that_do_not_parse(method, tiny_api, caplog):
    caplog.set_level(logging.DEBUG)
    with grpc.insecure_channel(_address(tiny_api, method)) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            _call(channel, method, [UNPARSEABLE])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = raised.value.details()
    assert f"not a valid {method.input_type.full_name} message" in details and "\n" not in details
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING], \
        "one DEBUG line at most, and no traceback"


def test_a_forward_stream_ends_invalid_argument_at_its_first_unparseable_message(tiny_api):
    """What came before is answered; the stream then ends with the status, and no session is left."""
    _, stages, _ = tiny_api
    first = valid_prefill("malformed-after", stages[1:])
    first.end_session = True
    answers = []
    with grpc.insecure_channel(stages[0]) as channel:
        call = channel.stream_stream("/layerline.v1.Stage/Forward", request_serializer=None,
                                     response_deserializer=stage_pb2.ForwardResponse.FromString)
        with pytest.raises(grpc.RpcError) as raised:
            for answer in call(iter([first.SerializeToString(), UNPARSEABLE]), timeout=30):
                answers.append(answer)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ForwardRequest" in raised.value.details()
    assert [a.status_code for a in answers] == [0] and answers[0].HasField("logits")
    assert stage_sessions(stages) == [0, 0]


def test_a_public_request_with_a_field_of_the_wrong_wire_type_is_refused(tiny_api):
    """max_new_tokens sent as bytes would otherwise read as unset (the default of 64 tokens)."""
    base = coordinator_pb2.GenerateRequest(prompt="hi", max_new_tokens=2).SerializeToString()
    generate = SERVICES[1].methods_by_name["Generate"]
    with grpc.insecure_channel(tiny_api[0]) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            _call(channel, generate, [base + bytes([4 << 3 | 2, 1, 0x40])])
        plain = coordinator_pb2.GenerateResponse.FromString(_call(channel, generate, [base])[0])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_new_tokens" in raised.value.details() and "wrong wire type" in raised.value.details()
    assert plain.completion_tokens == 2


@pytest.mark.skipif(not unix_socket.SUPPORTED, reason="same-machine sockets are Linux only")
@pytest.mark.parametrize("kind", [unix_socket.FORWARD, unix_socket.RESULTS], ids=["forward", "results"])
def test_the_same_machine_socket_answers_invalid_argument_in_band(kind, tiny_api):
    sock = unix_socket.connect(tiny_api[1][0], kind)
    assert sock is not None, "the stage listens on its socket"
    try:
        sock.settimeout(30)
        sock.sendall(len(UNPARSEABLE).to_bytes(4, "little") + UNPARSEABLE)
        answers = list(unix_socket.read_frames(sock, stage_pb2.ForwardResponse.FromString))
    finally:
        sock.close()
    assert len(answers) == 1, "one answer, then the stage closes the connection"
    assert answers[0].status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "not a valid message" in answers[0].error_message


class _StopNeverFinishes:
    def stop(self, grace):
        return threading.Event()  # never set, as grpcio's after some unparseable streams


def test_stopping_a_server_whose_stop_never_finishes_returns():
    started = time.monotonic()
    assert stop_server(_StopNeverFinishes(), grace_s=0.1, wait_s=0.2) is False
    assert time.monotonic() - started < 2


def test_the_exit_deadline_ends_a_process_that_a_stuck_thread_keeps_alive():
    script = ("import threading, time\n"
              "from protos.shutdown import exit_deadline\n"
              "threading.Thread(target=time.sleep, args=(600,)).start()\n"  # not a daemon: exit would wait
              "exit_deadline(0.5, status=3)\n")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert time.monotonic() - started < 30
    assert "exiting now" in result.stderr
