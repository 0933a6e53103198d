"""Dataset builders for offline-real image-text data: multi-style emoji and Tux Paint stamps."""
from clipforge.datasets.emoji import STYLES as EMOJI_STYLES
from clipforge.datasets.emoji import build_emoji
from clipforge.datasets.fetch import DatasetError
from clipforge.datasets.tuxpaint import build_tuxpaint

__all__ = ["EMOJI_STYLES", "DatasetError", "build_emoji", "build_tuxpaint"]
