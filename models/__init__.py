from core.accounting import Counts, ModelCounts
from models.config import ModelConfig
from models.transformer import ModelOutput, Transformer

__all__ = ["Counts", "ModelCounts", "ModelConfig", "ModelOutput", "Transformer"]
