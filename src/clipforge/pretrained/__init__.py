"""Pretrained weights: by (architecture, tag) or from a Hugging Face hub repo, downloaded into a verified cache."""
from clipforge.pretrained.download import cache_dir, download, is_offline
from clipforge.pretrained.hub import hub_folder
from clipforge.pretrained.registry import PretrainedTag, get_pretrained, list_pretrained

__all__ = ["PretrainedTag", "cache_dir", "download", "get_pretrained", "hub_folder", "is_offline", "list_pretrained"]
