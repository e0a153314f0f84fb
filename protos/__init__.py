"""The wire contract shared by the coordinator and the stage servers.

Owns: the .proto files, the Python stubs generated from them, and the tensor codec
(`protos.codec`). Knows nothing about models, sessions or scheduling.
"""
