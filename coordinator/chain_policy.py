"""Whether a coordinator lets its last stage send greedy decode steps straight to the first stage.

Owns: resolving `--chain auto|on|off` against the stages' addresses. Does not own greedy chaining
itself (engine and stage_server/greedy_chain.py) or when a group may chain (scheduler: only a
greedy group that has the stages to itself).

Why "auto" turns it off when every stage is on this machine: a chained step skips the hop back
through the coordinator, but the last stage's answer still reaches the coordinator and the client
at once, and their work then runs while the first stage computes its next step on the same cores,
stalling its thread team. On 2 shared cores float32 decode is faster unchained (2 stages: 0.919
against 0.885 of the unsplit model's speed); bfloat16 goes either way. Where a stage is on another
machine the coordinator's work overlaps no stage's compute there, and the chain saves a network
hop, so it stays on.
"""

from __future__ import annotations

from protos.addresses import is_loopback

CHAIN_SETTINGS = ("auto", "on", "off")


def chain_greedy_steps(setting: str, stage_addresses: tuple[str, ...] | list[str]) -> bool:
    """Resolve a --chain setting: on, off, or auto (off when every stage is on a loopback address)."""
    if setting not in CHAIN_SETTINGS:
        raise ValueError(f"chain must be one of {', '.join(CHAIN_SETTINGS)}, got {setting!r}")
    if setting == "auto":
        return not all(is_loopback(address) for address in stage_addresses)
    return setting == "on"
