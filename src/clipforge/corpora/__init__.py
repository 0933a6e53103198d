"""Dataset builders for offline-real image-text data: multi-style emoji, Tux Paint stamps and Iconify icons."""
from clipforge.corpora.emoji import EVAL_STYLES as EMOJI_EVAL_STYLES
from clipforge.corpora.emoji import STYLES as EMOJI_STYLES
from clipforge.corpora.emoji import build_emoji
from clipforge.corpora.fetch import DatasetError
from clipforge.corpora.icons import build_icons, concept_key, read_labels
from clipforge.corpora.tuxpaint import build_tuxpaint

__all__ = ["EMOJI_EVAL_STYLES", "EMOJI_STYLES", "DatasetError", "build_emoji", "build_icons", "build_tuxpaint",
           "concept_key", "read_labels"]
