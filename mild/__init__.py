"""mild: the thin MILD model package on diffusers; every kernel comes from mild_kernels.

The names below load on first use (PEP 562), so ``mild --help`` starts without torch.
"""

import importlib

_EXPORTS = {
    "cross_domain_attention_gap": ".cag",
    "HumanMorphologyGuidance": ".hmg", "guidance_image": ".hmg",
    "Layer": ".layers", "LayerPlan": ".layers", "plan_layers": ".layers",
    "MILDOutput": ".pipeline", "MILDPipeline": ".pipeline",
    "RegionContext": ".processors", "SMAAttnProcessor": ".processors", "enable_sma": ".processors",
    "tiny_components": ".tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mild' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
