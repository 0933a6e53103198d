"""clipforge: CLIP models, checkpoint interop, training, evaluation and search in one tool."""
from clipforge.checkpoint import LoadOptions, get_preprocess, get_tokenizer, load, save_pretrained
from clipforge.data.naflex import NaFlexTransform
from clipforge.data.transforms import EvalTransform, TrainTransform, image_transform
from clipforge.model import CLIP, CLIPConfig, TextConfig, VisionConfig, create_model, get_model_config, list_models
from clipforge.model.generation import decode
from clipforge.model.quantize import quantize
from clipforge.pretrained.registry import list_pretrained
from clipforge.text import CLIPTokenizer, tokenize

__version__ = "0.1.0"
__all__ = [
    "CLIP", "CLIPConfig", "CLIPTokenizer", "EvalTransform", "LoadOptions", "NaFlexTransform", "TextConfig",
    "TrainTransform", "VisionConfig", "create_model", "decode", "get_model_config", "get_preprocess", "get_tokenizer",
    "image_transform", "list_models", "list_pretrained", "load", "quantize", "save_pretrained", "tokenize", "wise",
]


def __getattr__(name: str):
    """`clipforge.wise` without importing the training stack at `import clipforge`."""
    if name == "wise":
        from clipforge.finetune.wise import wise

        return wise
    raise AttributeError(f"module 'clipforge' has no attribute {name!r}")
