"""Stage server: holds a contiguous slice of a model's layers and serves it over gRPC."""
