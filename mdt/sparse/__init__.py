"""Sparse voxel tensors and the operations the TRELLIS networks need, on any device."""
from .attention import (dense_attention, sparse_cross_attention, sparse_full_self_attention,
                        sparse_window_self_attention, varlen_attention)
from .backends import describe_backends, set_backends
from .conv import SparseConv3d, neighbour_map, submanifold_conv3d_torch
from .nn import SparseGELU, SparseGroupNorm32, SparseLinear, SparseSiLU, group_norm_per_sample
from .spatial import SparseDownsample, SparseSubdivide, SparseUpsample, downsample2, subdivide2, upsample2
from .tensor import (SparseTensor, from_dense, per_sample_mean, per_sample_sum, sparse_cat, sparse_unbind,
                     to_dense)

__all__ = [
    "SparseTensor", "per_sample_sum", "per_sample_mean", "sparse_cat", "sparse_unbind", "to_dense", "from_dense",
    "SparseConv3d", "neighbour_map", "submanifold_conv3d_torch", "SparseLinear", "SparseSiLU", "SparseGELU",
    "SparseGroupNorm32", "group_norm_per_sample", "SparseDownsample", "SparseUpsample", "SparseSubdivide",
    "downsample2", "upsample2", "subdivide2", "varlen_attention", "sparse_full_self_attention",
    "sparse_window_self_attention", "sparse_cross_attention", "dense_attention", "set_backends",
    "describe_backends",
]
