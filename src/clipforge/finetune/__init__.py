"""Fine-tuning a CLIP as a classifier (cross-entropy, FLYP, LP-FT) and WiSE-FT weight interpolation."""
from clipforge.finetune.config import METHODS, FinetuneConfig
from clipforge.finetune.run import finetune
from clipforge.finetune.wise import wise

__all__ = ["METHODS", "FinetuneConfig", "finetune", "wise"]
