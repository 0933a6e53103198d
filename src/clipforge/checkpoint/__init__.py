"""Checkpoint interop: OpenAI, open_clip, HF transformers and clipforge formats."""
from clipforge.checkpoint.io import get_tokenizer, load, save_pretrained

__all__ = ["get_tokenizer", "load", "save_pretrained"]
