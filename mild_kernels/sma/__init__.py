from .interface import SMAOutput, sma_attention
from .layout import SMALayout, prepare_regions
from .modulation import default_modulation
from .reference import sma_attention_reference
from .regions import RegionSort, region_sort, soft_regions

__all__ = ["SMALayout", "SMAOutput", "default_modulation", "prepare_regions", "RegionSort", "region_sort", "sma_attention", "sma_attention_reference", "soft_regions"]
