"""Dataset builders for offline-real image-text data: multi-style emoji, Tux Paint stamps and Iconify icons."""
from clipforge.datasets.emoji import EVAL_STYLES as EMOJI_EVAL_STYLES
from clipforge.datasets.emoji import STYLES as EMOJI_STYLES
from clipforge.datasets.emoji import build_emoji
from clipforge.datasets.fetch import DatasetError
from clipforge.datasets.icons import build_icons, concept_key, read_labels
from clipforge.datasets.tuxpaint import build_tuxpaint

__all__ = ["EMOJI_EVAL_STYLES", "EMOJI_STYLES", "DatasetError", "build_emoji", "build_icons", "build_tuxpaint",
           "concept_key", "read_labels"]
