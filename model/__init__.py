"""seekstack model: a hand-written DeepSeek-V3/V2 decoder (MLA, DeepSeekMoE, MTP) and its latent-cache generator."""

from .cache import LatentCache
from .checkpoint import CheckpointError, load_model, save_model
from .config import ConfigError, ModelConfig, preset
from .transformer import ModelOutput, Transformer

__all__ = ["CheckpointError", "ConfigError", "LatentCache", "ModelConfig", "ModelOutput", "Transformer",
           "load_model", "preset", "save_model"]
