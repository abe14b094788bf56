"""iRPE: image relative position encoding (Wu et al., ICCV 2021), independent of DETR.

* :func:`parse_rpe_spec` / :class:`RPEConfig` — the ``rpe-{ratio}-{method}-{mode}-{shared_head}-{rpe_on}`` spec.
* :func:`piecewise_index`, :func:`bucket_ids_2d`, :class:`BucketCache` — relative positions to buckets.
* :class:`RPETable`, :class:`CrossRPETable` — the learned lookup tables.
* :class:`RPEMultiheadAttention` — multi-head attention with iRPE.
"""
from .attention import RPE_IMPLS, RPEMultiheadAttention
from .buckets import TABLE_METHODS, BucketCache, bucket_ids_2d, piecewise_index
from .spec import METHODS, MODES, RPEConfig, as_rpe_config, num_buckets, parse_rpe_spec
from .tables import CrossRPETable, RPETable, build_table

__all__ = [
    "RPE_IMPLS", "RPEMultiheadAttention", "RPEConfig", "parse_rpe_spec", "as_rpe_config", "num_buckets",
    "piecewise_index", "bucket_ids_2d", "BucketCache", "RPETable", "CrossRPETable", "build_table",
    "METHODS", "MODES", "TABLE_METHODS",
]
