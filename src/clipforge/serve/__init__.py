"""HTTP search service over an image index: `create_app(index_dir)` (FastAPI) and `clipforge serve`."""
from clipforge.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
