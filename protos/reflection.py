"""Server reflection that also resolves method symbols, so ghz and grpcurl work by reflection alone.

Owns: the reflection service every layerline server exposes. Stock grpcio-reflection
answers "Symbol not found" for `layerline.v1.Coordinator.Generate` (ghz and
`grpcurl describe` ask for the file containing the *method*); here a method symbol is
answered with the file of its service.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc


class MethodAwareReflectionServicer(reflection.ReflectionServicer):
    """Stock reflection, plus `pkg.Service.Method` → the file defining `pkg.Service`."""

    def _file_containing_symbol(self, request, fully_qualified_name):
        pool = self._pool
        try:
            pool.FindFileContainingSymbol(fully_qualified_name)
        except KeyError:
            service_name, _, method_name = fully_qualified_name.rpartition(".")
            try:
                service = pool.FindServiceByName(service_name)
            except KeyError:
                service = None
            if service is not None and method_name in service.methods_by_name:
                return super()._file_containing_symbol(request, service_name)
        return super()._file_containing_symbol(request, fully_qualified_name)


def enable_reflection(server, service_names: list[str]) -> None:
    """Serve reflection for `service_names` (plus reflection itself) on a grpc.Server."""
    names = [*service_names, reflection.SERVICE_NAME]
    servicer = MethodAwareReflectionServicer(names, pool=descriptor_pool.Default())
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
