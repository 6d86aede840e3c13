"""What the user sees: the files ``agf-onnx explain`` writes (overlay PNGs, raw heatmaps,
``results.json`` and an ``index.html`` gallery that opens from disk) and the progress bar of
every long command."""

from __future__ import annotations

import html
import json
import os
import pathlib
import sys
from dataclasses import dataclass, field

import numpy as np

from .explain import Explanation
from .plots import DEFAULT_COLOUR_MAP


@dataclass
class ImageResult:
    image: str
    overlay: str | None = None
    heatmap: str | None = None
    classes: list[dict] = field(default_factory=list)  # the top classes: index, label, probability
    explained: list[dict] = field(default_factory=list)  # the classes the heatmaps explain
    notes: list[str] = field(default_factory=list)
    error: str | None = None


def unique_stem(path: pathlib.Path, taken: set[str]) -> str:
    stem, n = path.stem, 1
    while stem in taken:
        n += 1
        stem = f"{path.stem}_{n}"
    taken.add(stem)
    return stem


def write_image_outputs(explanation: Explanation, i: int, out: pathlib.Path, stem: str, result: ImageResult,
                        top: int = 5, cmap: str = DEFAULT_COLOUR_MAP) -> None:
    """``<stem>_agf.png`` (photo + one titled overlay per explained class, a colour bar) and ``<stem>_heatmap.npy``."""
    overlay, heatmap = out / f"{stem}_agf.png", out / f"{stem}_heatmap.npy"
    explanation.overlay(i, cmap=cmap).save(overlay)
    np.save(heatmap, explanation.heatmaps[i])
    result.overlay, result.heatmap = overlay.name, heatmap.name
    if explanation.probabilities is not None:
        order = np.argsort(-explanation.probabilities[i], kind="stable")[:top]
        result.classes = [{"class": int(c), "label": explanation.label(int(c)),
                           "probability": float(explanation.probabilities[i, c])} for c in order]
    result.explained = [{"class": int(c), "label": explanation.label(int(c)),
                         **({"probability": float(explanation.probabilities[i, c])}
                            if explanation.probabilities is not None and c >= 0 else {})}
                        for c in explanation.targets[i]]


def write_results(out: pathlib.Path, results: list[ImageResult], settings: dict, complete: bool = True) -> pathlib.Path:
    """``results.json``; ``complete`` false marks a run under way or interrupted (the images listed are those done)."""
    path = out / "results.json"
    path.write_text(json.dumps({"complete": complete, "settings": settings, "images": [r.__dict__ for r in results]},
                               indent=2))
    return path


def write_gallery(out: pathlib.Path, results: list[ImageResult], title: str) -> pathlib.Path:
    """A self-contained page: one card per image with its overlay, classes and probabilities."""
    cards = []
    for result in results:
        name = html.escape(os.path.basename(result.image))
        if result.error:
            cards.append(f'<div class="card error"><h3>{name}</h3><p>{html.escape(result.error)}</p></div>')
            continue
        explained = ", ".join(f"{html.escape(e['label'])}" + (f" ({e['probability']:.1%})" if "probability" in e else "")
                              for e in result.explained)
        top = "".join(f"<li>{html.escape(c['label'])}: {c['probability']:.1%}</li>" for c in result.classes)
        cards.append(f'<div class="card"><h3>{name}</h3><a href="{html.escape(result.overlay)}">'
                     f'<img src="{html.escape(result.overlay)}" alt="{name}"></a>'
                     f'<p>explained: {explained} · <a href="{html.escape(result.heatmap)}">heatmap.npy</a></p>'
                     f'<ol>{top}</ol></div>')
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em;background:#fafafa}}
.card{{display:inline-block;vertical-align:top;margin:.5em;padding:.5em;background:#fff;border:1px solid #ddd;max-width:48em}}
.card img{{max-width:100%}} .error{{border-color:#c00;color:#c00}} ol{{margin:.2em 0}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Each overlay is titled with the explained class and its probability; its colour bar shows the scale (+1: the
strongest evidence for the class, −1: as strong against). Left of each row: the image as the model saw it.</p>
{"".join(cards)}
</body></html>
"""
    path = out / "index.html"
    path.write_text(page)
    return path


def progress_bar(total: int, description: str | None = None):
    """A progress bar over ``total`` images on stderr (explain, evaluate and bank, either engine)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="image", file=sys.stderr, desc=description)


def warn(message: str, bar=None) -> None:
    """``message`` on its own line of stderr, above the progress bar ``bar`` when one is drawn
    (never inside the bar's line)."""
    if bar is None:
        print(message, file=sys.stderr)
    else:
        bar.write(message, file=sys.stderr)
