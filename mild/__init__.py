"""mild: the thin MILD model package on diffusers; every kernel comes from mild_kernels."""

from .cag import cross_domain_attention_gap
from .processors import RegionContext, SMAAttnProcessor, enable_sma

__all__ = ["RegionContext", "SMAAttnProcessor", "cross_domain_attention_gap", "enable_sma"]
