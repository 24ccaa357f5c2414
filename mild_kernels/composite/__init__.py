from .interface import composite_layers
from .reference import composite_layers_reference

__all__ = ["composite_layers", "composite_layers_reference"]
