"""Checks shared by the figure tests: PNG pixel size = figure inches × dpi, parseable SVG."""
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

DPI = 80  # smaller than the default: faster, same code paths


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.size  # (width, height)


def svg_size_px(path: Path, dpi: int) -> tuple[int, int]:
    root = ET.parse(path).getroot()
    w, h = (float(root.get(k).removesuffix("pt")) for k in ("width", "height"))
    return round(w / 72 * dpi), round(h / 72 * dpi)


def check_figure(paths, stem: str, dpi: int = DPI, formats=("png", "svg")) -> tuple[int, int]:
    assert [p.name for p in paths] == [f"{stem}.{f}" for f in formats]
    for p in paths:
        assert p.is_file() and p.stat().st_size > 2000, p
    size = png_size(paths[0])
    if "svg" in formats:
        assert size == svg_size_px(paths[1], dpi)  # pixel size = figure inches × dpi, nothing cropped
        text = paths[1].read_text()
        assert "<!--" in text or "<svg" in text
    assert 300 <= size[0] <= 4000 and 200 <= size[1] <= 4000, size
    return size


