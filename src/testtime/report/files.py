"""Writing report files: figures, JSON and pages, each atomically (a temporary
name, then a rename), so an interrupted report never leaves a torn file."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any


def write_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_json(path: Path, obj: Any) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, default=str))


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Lay out, save and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path


def embed_png(path: Path, style: str = "max-width:100%") -> str:
    """An <img> carrying the PNG itself, so the page is one self-contained file."""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" style="{style}" src="data:image/png;base64,{data}">'
