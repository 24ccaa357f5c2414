"""mild-kernels: fused kernels for MILD, region-aware multi-layer diffusion."""

from .sma import (RegionSort, SMALayout, SMAOutput, default_modulation, prepare_regions, region_sort, sma_attention,
                  sma_attention_reference, soft_regions)
from .multi_lora import MultiLoRALinear, apply_multi_lora, multi_lora_linear, set_adapter_ids
from .fused_step import FusedStep, KnownRegion
from .composite import composite_layers

__version__ = "0.1.0"

__all__ = ["RegionSort", "SMALayout", "SMAOutput", "default_modulation", "prepare_regions", "region_sort", "sma_attention", "sma_attention_reference", "soft_regions"]
__all__ += ["MultiLoRALinear", "apply_multi_lora", "multi_lora_linear", "set_adapter_ids"]
__all__ += ["FusedStep", "KnownRegion", "composite_layers"]
