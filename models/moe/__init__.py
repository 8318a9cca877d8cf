"""DeepSeekMoE feed-forward block: shared + fine-grained routed experts, dropless top-k routing,
auxiliary-loss-free balancing, deterministic grouped/batched expert compute, exact accounting.
Names are imported lazily: :mod:`models.moe.config` stays torch-free."""
from core.lazy import lazy_exports

_EXPORTS = {"MoEConfig": "models.moe.config", "ExpertDispatch": "models.moe.dispatch",
            "RoutedExperts": "models.moe.experts", "MoEFFN": "models.moe.layer", "build_moe_ffn": "models.moe.layer",
            "Routing": "models.moe.router", "TopKRouter": "models.moe.router"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
