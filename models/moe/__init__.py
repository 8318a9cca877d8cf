"""DeepSeekMoE feed-forward block: shared + fine-grained routed experts, dropless top-k routing,
auxiliary-loss-free balancing, deterministic grouped/batched expert compute, exact accounting."""
from models.moe.config import MoEConfig
from models.moe.dispatch import ExpertDispatch
from models.moe.experts import RoutedExperts
from models.moe.layer import MoEFFN, build_moe_ffn
from models.moe.router import Routing, TopKRouter

__all__ = ["MoEConfig", "MoEFFN", "build_moe_ffn", "ExpertDispatch", "RoutedExperts", "Routing", "TopKRouter"]
