"""The backbone: attention, dense and MoE FFNs, multi-branch residual, Transformer. It imports only
``core``; a memory branch is handed to the Transformer (see assembly.build_model). Names are imported
lazily: :mod:`models.config` stays torch-free."""
from core.lazy import lazy_exports

_EXPORTS = {"MemoryBuilder": "models.transformer", "ModelConfig": "models.config",
            "ModelOutput": "models.transformer", "Transformer": "models.transformer"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
