"""The backbone: attention, dense and MoE FFNs, multi-branch residual, Transformer. It imports only
``core``; a memory branch is handed to the Transformer (see assembly.build_model)."""
from models.config import ModelConfig
from models.transformer import MemoryBuilder, ModelOutput, Transformer

__all__ = ["MemoryBuilder", "ModelConfig", "ModelOutput", "Transformer"]
