"""A bounded fuzzer over every RPC of the Stage and Coordinator services.

Owns: the valid requests each RPC is fuzzed from (`Seeds`: prefills, decode steps, greedy chains,
cache edits, hidden states sent straight to the last stage, sessions ended, generations by
prompt, token ids and chat), the calls themselves (raw bytes over a generic gRPC call, so that
any bytes can be sent; every call has a deadline), the tally of what came back by RPC and status
code, in-band codes of ForwardResponse included (`Tally`), and `Fuzzer`, which sends one mutated
request per message index from a Random seeded by (seed, index): a failure names its RPC,
index, seed and mutation, and `Fuzzer.send(method, index)` with that seed sends it again.
The RPCs are enumerated from the service descriptors, so an RPC added to a .proto is fuzzed
(from its empty request) without a change here.

Both profiles run through `run_profile` (bench/fuzz_pipeline.py, which owns the processes): the
quick one in tests/test_fuzz.py, the long one here (`make fuzz`).

Does not own: the mutations (fuzz_mutations) or the processes, their memory, health and exit
(fuzz_pipeline).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzz_mutations import junk, mutate_fields, mutate_wire  # noqa: E402
from google.protobuf import message_factory  # noqa: E402
from google.protobuf.descriptor import MethodDescriptor  # noqa: E402

from protos import codec, coordinator_pb2, stage_pb2  # noqa: E402
from protos.channel_options import channel_options  # noqa: E402

STAGE = stage_pb2.DESCRIPTOR.services_by_name["Stage"]
COORDINATOR = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"]
FORBIDDEN = frozenset({"INTERNAL", "UNKNOWN"})  # a bug, whichever request caused it
CALL_DEADLINE_S = 10.0
OPEN_STREAM_DEADLINE_S = 0.3  # a Results subscription waits for answers: cut it short
ERROR_VALUES = {code.value[0]: code.name for code in grpc.StatusCode}
TEXT_IDS = 90  # token ids below this are characters of the tiny tokenizer, which the coordinator takes
# Answers to valid requests that are not OK yet right: a Results subscription stays open until its
# deadline; a micro-batch sent on towards a collector is reported unreachable when its stream
# closes before the answer could come back that way (stage_server/next_hop.py: the link cannot know).
VALID_ANSWERS = {"Stage.Results": ("DEADLINE_EXCEEDED",), "Stage.Forward": ("UNAVAILABLE (in-band)",)}


@dataclass(frozen=True)
class Deployment:
    """What the seeds are made for: the stages (in layer order), the coordinator, and the model."""

    stages: tuple[str, ...]
    coordinator: str
    fingerprint: str
    hidden_size: int
    vocab_size: int
    collector_id: str  # a Results subscription the fuzzer holds on the last stage, for reply_to seeds


@dataclass
class Tally:
    """What came back, by RPC: calls, messages sent, and status codes (in-band ones marked)."""

    calls: Counter = field(default_factory=Counter)
    messages: Counter = field(default_factory=Counter)
    codes: dict[str, Counter] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    sessions: set = field(default_factory=set)  # (stage index, session id) of every session a seed started
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, rpc: str, code: str, messages: int = 0, call: bool = False, failure: str = "") -> None:
        with self.lock:
            self.codes.setdefault(rpc, Counter())[code] += 1
            self.messages[rpc] += messages
            self.calls[rpc] += call
            if failure:
                self.failures.append(failure)

    def started(self, stage: int, session: str) -> None:
        with self.lock:
            self.sessions.add((stage, session))

    def summary(self) -> dict:
        return {rpc: {"calls": self.calls[rpc], "messages": self.messages[rpc], "codes": dict(self.codes[rpc])}
                for rpc in sorted(self.codes)}


def _forbidden(code: str) -> bool:
    """Whether a code as tallied ("INTERNAL", "INTERNAL (in-band)") is one that only a bug gives."""
    return code.split()[0] in FORBIDDEN


def _rpc_name(method: MethodDescriptor) -> str:
    return f"{method.containing_service.name}.{method.name}"


class Seeds:
    """Valid requests for each RPC of a deployment: `plan(method, rng, index)` -> (address, messages)."""

    def __init__(self, deployment: Deployment, tally: Tally) -> None:
        self.d = deployment
        self.tally = tally

    def _ids(self, rng: random.Random, count: int) -> np.ndarray:
        return np.array([[rng.randrange(3, self.d.vocab_size) for _ in range(count)]], dtype=np.int64)

    def _step(self, session: str, batch: int, values: np.ndarray | None, positions: range, route, **fields):
        request = stage_pb2.ForwardRequest(
            session_id=session, micro_batch_id=batch, route=route, model_fingerprint=self.d.fingerprint,
            position_ids=codec.encode_int64(np.array([list(positions)], dtype=np.int64)), **fields)
        if values is not None:
            request.activations.CopyFrom(codec.encode_int64(values) if values.dtype == np.int64
                                         else codec.encode_float32(values))
        request.attention_mask.CopyFrom(codec.encode_int64(np.ones((1, positions.stop), dtype=np.int64)))
        return request

    def _forward(self, rng: random.Random, index: int) -> tuple[str, list]:
        stages, session = self.d.stages, f"fuzz-{index}"
        first, rest = stages[0], list(stages[1:])
        n = rng.randint(1, 6)
        prompt = self._ids(rng, n)
        kind = rng.randrange(5)
        if kind == 4:  # hidden states straight to the last stage
            self.tally.started(len(stages) - 1, session)
            hidden = np.asarray([[[rng.uniform(-2, 2) for _ in range(self.d.hidden_size)] for _ in range(n)]],
                                dtype=np.float32)
            return stages[-1], [self._step(session, 1, hidden, range(n), [], start_session=True, end_session=True)]
        self.tally.started(0, session)
        prefill = self._step(session, 1, prompt, range(n), rest, start_session=True,
                             logits_top_k=rng.choice((0, 1, 5)))
        if kind == 0:
            prefill.end_session = True
            return first, [prefill]
        if kind == 2:  # a greedy chain answered to the fuzzer's collector
            prefill.logits_top_k, prefill.reply_to, prefill.chain_steps = 1, self.d.collector_id, 2
            prefill.chain_route.extend(stages)
            prefill.chain_stop_ids.append(2)
            return first, [prefill]
        decode = self._step(session, 2, self._ids(rng, 1), range(n, n + 1), rest, end_session=True)
        if kind == 3:
            decode.cache_edit.keep_rows.append(0)
            decode.cache_edit.keep_positions = n
        return first, [prefill, decode]

    @staticmethod
    def _session(rng: random.Random, index: int) -> str:
        """The session of an earlier message (which may have ended, or never started)."""
        return f"fuzz-{rng.randrange(index + 1)}"

    def plan(self, method: MethodDescriptor, rng: random.Random, index: int) -> tuple[str, list]:
        d = self.d
        name = _rpc_name(method)
        if name == "Stage.Forward":
            return self._forward(rng, index)
        if name == "Stage.EndSession":
            return d.stages[0], [stage_pb2.EndSessionRequest(session_id=self._session(rng, index), route=d.stages[1:])]
        if name == "Stage.Results":
            return d.stages[-1], [stage_pb2.ResultsRequest(collector_id=f"fuzz-results-{index}")]
        if name == "Stage.SetDeployment":  # the deployment it has, to each stage in turn
            return d.stages[index % len(d.stages)], [stage_pb2.SetDeploymentRequest(stages=d.stages)]
        if name == "Stage.StopChain":
            return rng.choice(d.stages), [stage_pb2.StopChainRequest(session_id=self._session(rng, index))]
        if name.startswith("Coordinator.Generate"):
            request = coordinator_pb2.GenerateRequest(max_new_tokens=rng.randint(1, 4), ignore_eos=rng.random() < 0.5)
            source = rng.randrange(3)
            text = "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randint(1, 20)))
            if source == 0:
                request.prompt = text
            elif source == 1:
                request.token_ids.extend(rng.randrange(3, TEXT_IDS) for _ in range(rng.randint(1, 8)))
            else:
                request.messages.add(role="user", content=text)
            if rng.random() < 0.5:
                request.temperature, request.top_k, request.top_p, request.seed = 0.8, 20, 0.9, index
            if rng.random() < 0.3:
                request.stop.append("xyz")
            return d.coordinator, [request]
        address = d.coordinator if method.containing_service is COORDINATOR else rng.choice(d.stages)
        return address, [message_factory.GetMessageClass(method.input_type)()]  # Info, GetModelInfo, and new RPCs


def mutate(message, rng: random.Random) -> tuple[bytes, str]:
    """One bad version of `message`: parseable with an edge value, changed on the wire, or junk."""
    roll = rng.random()
    if roll < 0.4:
        return mutate_fields(message, rng)
    if roll < 0.85:
        return mutate_wire(message.SerializeToString(), rng)
    return junk(rng)


class Fuzzer:
    """Sends mutated requests to a deployment and tallies what comes back."""

    def __init__(self, deployment: Deployment, seed: int) -> None:
        self.deployment = deployment
        self.seed = seed
        self.tally = Tally()
        self.seeds = Seeds(deployment, self.tally)
        self._channels = {a: grpc.insecure_channel(a, options=channel_options())
                          for a in (*deployment.stages, deployment.coordinator)}

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def _call(self, method: MethodDescriptor, address: str, payloads: list[bytes]):
        """The answers (a list) of one call with raw request bytes; raises grpc.RpcError."""
        path = f"/{method.containing_service.full_name}/{method.name}"
        parse = message_factory.GetMessageClass(method.output_type).FromString
        channel = self._channels[address]
        deadline = OPEN_STREAM_DEADLINE_S if method.server_streaming and not method.client_streaming \
            and method.containing_service is STAGE else CALL_DEADLINE_S
        if method.client_streaming:
            call = (channel.stream_stream if method.server_streaming else channel.stream_unary)(
                path, request_serializer=None, response_deserializer=parse)
            answers = call(iter(payloads), timeout=deadline)
        else:
            call = (channel.unary_stream if method.server_streaming else channel.unary_unary)(
                path, request_serializer=None, response_deserializer=parse)
            answers = call(payloads[0], timeout=deadline)
        return list(answers) if method.server_streaming else [answers]

    def send(self, method: MethodDescriptor, index: int, tally: Tally | None = None, *, mutated: bool = True) -> None:
        """Message `index`: a valid plan for `method` with one of its messages mutated (or, with
        `mutated` False, none: then any answer but OK counts as a failure, save VALID_ANSWERS')."""
        rng = random.Random(f"{self.seed}:{index}")
        address, messages = self.seeds.plan(method, rng, index)
        bad = rng.randrange(len(messages)) if mutated else -1
        payload, mutation = mutate(messages[bad], rng) if mutated else (b"", "valid")
        payloads = [payload if i == bad else m.SerializeToString() for i, m in enumerate(messages)]
        allowed = {"OK", *VALID_ANSWERS.get(_rpc_name(method), ())}
        failing = _forbidden if mutated else (lambda code: code not in allowed)
        self.record(method, address, payloads, f"message {index} (seed {self.seed}, {mutation})", tally, failing)

    def record(self, method: MethodDescriptor, address: str, payloads: list[bytes], what: str,
               tally: Tally | None = None, failing=None) -> None:
        """Send one call and count what came back in `tally` (the fuzz's own by default); a code for
        which `failing(code)` holds is a failure (by default INTERNAL and UNKNOWN, in-band too)."""
        failing = failing or _forbidden
        tally = tally or self.tally
        rpc = _rpc_name(method)
        try:
            answers, code, details = self._call(method, address, payloads), "OK", ""
        except grpc.RpcError as err:
            answers, code, details = [], err.code().name, err.details() or ""
        for answer in answers:
            in_band = ERROR_VALUES.get(getattr(answer, "status_code", 0) or 0, "OK")
            if in_band != "OK":
                label = f"{in_band} (in-band)"
                failure = f"{rpc} {what}: in-band {in_band}: {answer.error_message}" if failing(label) else ""
                tally.count(rpc, label, failure=failure)
        tally.count(rpc, code, messages=len(payloads), call=True,
                    failure=f"{rpc} {what}: {code}: {details}" if failing(code) else "")

    def run(self, plan: list[tuple[MethodDescriptor, int]], first_index: int = 0, workers: int = 2) -> None:
        """Send one mutated message per entry of `plan` (method, count), interleaved, on `workers` threads."""
        order = [method for method, count in plan for _ in range(count)]
        random.Random(f"{self.seed}:order:{first_index}").shuffle(order)
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda item: self.send(item[1], item[0]), enumerate(order, first_index)))

    def valid(self, calls_per_rpc: int, first_index: int) -> Tally:
        """Each RPC's seeds sent unmutated, `calls_per_rpc` times each (they must be answered OK)."""
        tally = Tally()
        index = first_index
        for service in (STAGE, COORDINATOR):
            # SetDeployment first: mutated ones, from this machine (which a stage trusts), may have told
            # a stage another deployment; the valid seed tells it its own again before anything is routed
            for method in sorted(service.methods, key=lambda m: m.name != "SetDeployment"):
                for _ in range(calls_per_rpc):
                    self.send(method, index, tally, mutated=False)
                    index += 1
        return tally

    def flood(self, method: MethodDescriptor, address: str, calls: int, tally: Tally, workers: int = 2) -> None:
        """`calls` calls whose every message is random bytes that are not a valid request, counted in `tally`."""
        def one(index: int) -> None:
            rng = random.Random(f"{self.seed}:flood:{index}")
            # field 1 with wire type 6 or 7, which no message has: never parses, whatever follows
            payloads = [bytes([rng.choice((0x0E, 0x0F))]) + rng.randbytes(rng.randint(1, 40))
                        for _ in range(rng.randint(1, 3))]
            self.record(method, address, payloads[:1] if not method.client_streaming else payloads,
                        f"flood call {index} (seed {self.seed})", tally)

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(calls)))


def split(service, messages: int) -> list[tuple[MethodDescriptor, int]]:
    """`messages` shared evenly over every RPC of `service`."""
    methods = list(service.methods)
    return [(m, messages // len(methods) + (i < messages % len(methods))) for i, m in enumerate(methods)]


def main(argv: list[str] | None = None) -> int:
    from fuzz_pipeline import run_profile

    parser = argparse.ArgumentParser(description="fuzz every RPC of a tiny pipeline (2 stages + coordinator)")
    parser.add_argument("--messages", type=int, default=20_000, help="mutated messages in all (default 20000)")
    parser.add_argument("--stage-share", type=float, default=0.6, help="share of them sent to the stages")
    parser.add_argument("--flood", type=int, default=20_000, help="unparseable calls to the coordinator")
    parser.add_argument("--stage-flood", type=int, default=20_000, help="unparseable calls to each stage")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=4, help="calls in flight at once")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    report = run_profile(messages=args.messages, stage_share=args.stage_share, flood=args.flood,
                         stage_flood=args.stage_flood, seed=args.seed, workers=args.workers)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
