"""`clipforge demo`: train CLIP on real multi-style emoji and reproduce the paper's findings in one report."""
from clipforge.demo.config import DemoConfig
from clipforge.demo.run import run_demo

__all__ = ["DemoConfig", "run_demo"]
