"""What the coordinator and the stage servers share.

Owns: the wire contract (the .proto files and the stubs generated from them), the tensor codec
(`protos.codec`), addressing and transport settings both sides dial with, and `protos.model_files`
(where model checkpoints live on disk and how the known ones get there). Knows nothing about
sessions, batching or scheduling.
"""
