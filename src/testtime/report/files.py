"""Writing report files: figures, JSON and pages (rendered from `templates/`), each
atomically (`testtime.files`), so an interrupted report never leaves a torn file."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from ..files import atomic_path, write_text


def write_atomic(path: Path, text: str) -> Path:
    return write_text(path, text)


def write_json(path: Path, obj: Any) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, default=str))


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Lay out, save and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or None)
    finally:
        plt.close(fig)
    return path


def png_uri(path: Path) -> str:
    """A PNG as a data URI, so the page that shows it is one self-contained file."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


_ENV = None


def render_page(template: str, out: Path, **context: Any) -> Path:
    """Render a page template from `report/templates` (autoescaped) and write it atomically."""
    global _ENV
    if _ENV is None:
        import jinja2

        _ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
                                  autoescape=True, trim_blocks=True)
    return write_atomic(out, _ENV.get_template(template).render(**context))
