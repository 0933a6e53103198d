"""Fine-tuning a CLIP as a classifier (cross-entropy, FLYP, LP-FT) and WiSE-FT weight interpolation
(`clipforge.wise`, in `finetune/wise.py`)."""
from clipforge.finetune.config import METHODS, FinetuneConfig
from clipforge.finetune.run import finetune

__all__ = ["METHODS", "FinetuneConfig", "finetune"]
