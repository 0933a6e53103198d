"""CLIP model definitions, configs and the architecture registry."""
from clipforge.model.clip import CLIP
from clipforge.model.config import CLIPConfig, TextConfig, VisionConfig, get_model_config, list_models
from clipforge.model.factory import create_model

__all__ = ["CLIP", "CLIPConfig", "TextConfig", "VisionConfig", "create_model", "get_model_config", "list_models"]
