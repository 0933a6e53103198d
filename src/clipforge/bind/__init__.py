"""Binding a new modality to a frozen CLIP (ImageBind): `clipforge bind`, `clipforge.bind.bind`."""
from clipforge.bind.config import BindConfig
from clipforge.bind.run import bind

__all__ = ["BindConfig", "bind"]
