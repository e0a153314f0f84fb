"""Whether the stages of a chain agree on what decides their numbers, before the coordinator serves them.

Owns: `PipelineSetupError` (the stages cannot serve together); refusing a chain whose stages speak
another protocol than this coordinator, or differ in model fingerprint (config and tensor layout)
or weights manifest id (the tensors' contents, digested on each stage's own machine); refusing one
whose stages run other torch or transformers versions unless `--allow-mixed-versions` (then one
warning naming the stages); reporting a chain that mixes CPU and GPU stages (served, with one
warning); and the `--allow-mixed-versions` flag. Each refusal is one line naming the stages
(address and layers) and the values that differ.

Does not own: waiting for the stages or checking that their layers form one route (app), nor
what the stages report (stage_server/servicer.py, stage_server/weights_manifest.py).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence

from protos import stage_pb2
from protos.protocol import PROTOCOL_VERSION

log = logging.getLogger(__name__)


class PipelineSetupError(RuntimeError):
    """The stages cannot serve together; the message says what to fix."""

# Libraries whose versions change a stage's numbers (kernels, layer code); a chain must share them.
NUMERIC_LIBRARIES = ("torch", "transformers")


def add_mixed_versions_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-mixed-versions", action="store_true",
                        help="serve stages that run different torch or transformers versions (warns once, naming "
                             "them); without it such a chain is refused, as their numbers may differ")


def _stage(address: str, info: stage_pb2.InfoResponse) -> str:
    return f"{address} (layers {info.layer_start}:{info.layer_end})"


def _groups(addresses: Sequence[str], infos: Sequence[stage_pb2.InfoResponse],
            value_of: Callable[[stage_pb2.InfoResponse], str]) -> dict[str, list[str]]:
    """Value → the stages that report it, in chain order."""
    groups: dict[str, list[str]] = {}
    for address, info in zip(addresses, infos):
        groups.setdefault(value_of(info) or "(none)", []).append(_stage(address, info))
    return groups


def _describe(groups: dict[str, list[str]]) -> str:
    return "; ".join(f"{value} on {', '.join(stages)}" for value, stages in groups.items())


def _library_versions(info: stage_pb2.InfoResponse) -> str:
    return ", ".join(f"{name} {info.versions.get(name, 'unknown')}" for name in NUMERIC_LIBRARIES)


def chain_refusal(addresses: Sequence[str], infos: Sequence[stage_pb2.InfoResponse], *,
                  allow_mixed_versions: bool = False) -> str | None:
    """Why these stages must not serve together (one line), or None. Warns, once per call, of a
    mixed-version chain that is allowed and of a chain whose stages run on different kinds of device."""
    protocols = _groups(addresses, infos, lambda info: str(info.protocol_version))
    if set(protocols) != {str(PROTOCOL_VERSION)}:
        return (f"stages speak another stage protocol than this coordinator ({PROTOCOL_VERSION}): "
                f"{_describe(protocols)}; run the same layerline version on every machine")
    fingerprints = _groups(addresses, infos, lambda info: info.model_fingerprint)
    if len(fingerprints) > 1:
        return (f"stages serve different models (model fingerprint {_describe(fingerprints)}); every stage must "
                "load the same checkpoint (same config and tensors)")
    manifests = _groups(addresses, infos, lambda info: info.weights_manifest_id)
    if len(manifests) > 1:
        return (f"stages hold different weights for the same model (weights manifest id {_describe(manifests)}); "
                "copy or fetch the same weights to every machine (a stage whose files changed since its "
                "manifest was made refuses to start; delete layerline-manifest.json there to make it anew)")
    libraries = _groups(addresses, infos, _library_versions)
    if len(libraries) > 1:
        if not allow_mixed_versions:
            return (f"stages run different library versions ({_describe(libraries)}), so their numbers may differ; "
                    "install the same versions on every machine (constraints.txt) or pass --allow-mixed-versions")
        log.warning("stages run different library versions (--allow-mixed-versions): %s; their numbers may differ",
                    _describe(libraries))
    devices = _groups(addresses, infos, lambda info: info.device.partition(":")[0])
    if len(devices) > 1:
        # A warning so that the default log level shows it: served, but its numbers may differ in the last
        # bits from a chain on one kind of device.
        log.warning("the chain mixes devices (served): %s",
                    _describe(_groups(addresses, infos, lambda info: info.device)))
    return None
