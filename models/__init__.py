"""The backbone: config, transformer, accounting (names imported lazily: :mod:`models.config` stays torch-free)."""
from core.lazy import lazy_exports

_EXPORTS = {"Counts": "models.accounting", "ModelCounts": "models.accounting", "ModelConfig": "models.config",
            "ModelOutput": "models.transformer", "Transformer": "models.transformer"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
