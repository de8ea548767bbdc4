"""Tensor subclasses holding packed weights."""

from .binary_sparse_tensor import BinarySparseTensor

__all__ = ["BinarySparseTensor"]
