"""Postbus bus contracts: every subject, stream and request/reply pair, declared once."""

from postbus.proto import directory, mail, store
from postbus.proto.base import Model, Registry, Rpc, RpcError, Stream, Subject


def _collect() -> Registry:
    reg = Registry()
    for module in (mail, directory, store):
        for value in vars(module).values():
            if isinstance(value, Stream) and value not in reg.streams:
                reg.streams.append(value)
            elif isinstance(value, Subject):
                reg.subjects.append(value)
            elif isinstance(value, Rpc):
                reg.rpcs.append(value)
    return reg


REGISTRY = _collect()
ALL_STREAMS = REGISTRY.streams

__all__ = ["REGISTRY", "ALL_STREAMS", "Model", "Rpc", "RpcError", "Stream", "Subject"]
