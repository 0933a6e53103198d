"""Rendering for the corpus builders: SVG to RGBA with resvg-py, and one square, white-backed size for every image."""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from clipforge.data.images import composite_on_white
from clipforge.errors import DatasetError

FALLBACK_FONT = "DejaVu Sans"  # Debian's default font; SVG text in a missing font renders nothing without it


def render_svg(svg: str | Path, width: int | None = None, height: int | None = None, zoom: float | None = None,
               system_fonts: bool = False) -> Image.Image:
    """Render SVG markup or an SVG file to an RGBA image with resvg-py."""
    try:
        import resvg_py
    except ImportError:
        raise DatasetError("rendering SVG needs the resvg-py package: `pip install resvg-py`") from None
    # dpi 96 (the CSS pixel): resvg-py defaults to 0, which sizes "128pt"-style roots to nothing.
    options = {"width": width, "height": height, "zoom": zoom, "skip_system_fonts": not system_fonts, "dpi": 96.0}
    if system_fonts:  # resvg falls back to the generic serif font (Times New Roman) for unknown families
        options.update(font_family=FALLBACK_FONT, serif_family=FALLBACK_FONT)
    options = {k: v for k, v in options.items() if v is not None}
    if isinstance(svg, Path):  # a file: relative xlink:href images resolve next to it
        data = resvg_py.svg_to_bytes(svg_path=str(svg), resources_dir=str(svg.parent), **options)
    else:
        data = resvg_py.svg_to_bytes(svg_string=svg, **options)
    image = Image.open(io.BytesIO(bytes(data)))
    image.load()
    return image.convert("RGBA")


def pad_square(image: Image.Image) -> Image.Image:
    """Centre an RGBA image on a transparent square canvas of its longer side."""
    side = max(image.size)
    if image.width == image.height:
        return image
    canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def to_size(image: Image.Image, size: int) -> Image.Image:
    """Pad to square, composite on white and resize to size x size (Lanczos) as RGB."""
    square = composite_on_white(pad_square(image.convert("RGBA")))
    return square if square.size == (size, size) else square.resize((size, size), Image.LANCZOS)
