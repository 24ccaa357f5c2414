"""mild: the thin MILD model package on diffusers; every kernel comes from mild_kernels."""

from .cag import cross_domain_attention_gap
from .hmg import HumanMorphologyGuidance, guidance_image
from .layers import Layer, LayerPlan, plan_layers
from .pipeline import MILDOutput, MILDPipeline
from .processors import RegionContext, SMAAttnProcessor, enable_sma
from .tiny import tiny_components

__all__ = ["HumanMorphologyGuidance", "Layer", "LayerPlan", "MILDOutput", "MILDPipeline", "RegionContext",
           "SMAAttnProcessor", "cross_domain_attention_gap", "enable_sma", "guidance_image", "plan_layers",
           "tiny_components"]
