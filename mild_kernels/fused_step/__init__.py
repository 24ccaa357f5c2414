from .interface import FusedStep
from .reference import KnownRegion, fused_step_reference
from .schedulers import SUPPORTED

__all__ = ["FusedStep", "KnownRegion", "SUPPORTED", "fused_step_reference"]
