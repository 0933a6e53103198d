"""Checkpoint interop: OpenAI, open_clip, HF transformers and clipforge formats."""
from clipforge.checkpoint.io import get_preprocess, get_tokenizer, load, save_pretrained
from clipforge.checkpoint.options import LoadOptions

__all__ = ["LoadOptions", "get_preprocess", "get_tokenizer", "load", "save_pretrained"]
