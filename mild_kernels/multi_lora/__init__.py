from .interface import multi_lora_linear
from .module import MultiLoRALinear, apply_multi_lora, set_adapter_ids
from .reference import multi_lora_linear_reference

__all__ = ["MultiLoRALinear", "apply_multi_lora", "multi_lora_linear", "multi_lora_linear_reference",
           "set_adapter_ids"]
