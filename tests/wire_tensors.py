"""Helpers shared by the wire codec tests (test_codec.py, test_int8_codec.py): the codec constants,
a message's trip over the wire, sample tensors of every dtype, and the malformed-message check."""

from __future__ import annotations

import warnings

import pytest
import torch

from protos import stage_pb2
from protos.codec import WireFormatError, decode, encode

NONE, FP16, BF16, INT8 = (stage_pb2.CODEC_NONE, stage_pb2.CODEC_FP16, stage_pb2.CODEC_BF16,
                          stage_pb2.CODEC_INT8)
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def wire(message: stage_pb2.Tensor) -> stage_pb2.Tensor:
    """What the receiver gets: the message serialized and parsed again."""
    return stage_pb2.Tensor.FromString(message.SerializeToString())


def roundtrip(tensor: torch.Tensor, codec_value: int = NONE,
              **kwargs) -> tuple[stage_pb2.Tensor, torch.Tensor]:
    message = wire(encode(tensor, codec_value, **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "non-writable buffer" warning
        return message, decode(message)


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def rejects(message: stage_pb2.Tensor, match: str, **kwargs) -> None:
    with pytest.raises(WireFormatError, match=match):
        decode(message, **kwargs)
