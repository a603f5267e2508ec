"""arcopo_fast: AR-CoPO for streaming autoregressive video generators, built for throughput.

For use from other projects (see the README's "Use it from your project"):

    from arcopo_fast import StreamingPipeline            # diffusers-style streaming text-to-video
    from arcopo_fast import flash_attn_with_kvcache      # flash-attn's KV-cache attention call

The exports are imported on first use, so `import arcopo_fast` stays light (and a test can set
TRITON_INTERPRET before anything imports triton).
"""

__version__ = "0.1.0"

_EXPORTS = {
    "StreamingPipeline": "arcopo_fast.pipeline",
    "StreamingPipelineOutput": "arcopo_fast.pipeline",
    "load_generator": "arcopo_fast.pipeline",
    "flash_attn_with_kvcache": "arcopo_fast.flash_compat",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'arcopo_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
