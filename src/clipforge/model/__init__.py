"""CLIP model definitions, configs, text towers and the architecture registry."""
from clipforge.model.clip import CLIP
from clipforge.model.config import CLIPConfig, TextConfig, VisionConfig, get_model_config, list_models
from clipforge.model.factory import create_model
from clipforge.model.towers import TEXT_TOWERS, tokenizer_for

__all__ = ["CLIP", "CLIPConfig", "TEXT_TOWERS", "TextConfig", "VisionConfig", "create_model", "get_model_config",
           "list_models", "tokenizer_for"]
