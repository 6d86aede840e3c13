"""Pictures drawn with Pillow (no plotting library needed by the package): the perturbation curves
of ``evaluate`` and the titled heatmap overlays of ``explain``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: Distinguishable line colours (Okabe–Ito, then Tableau), one per method in order.
PALETTE = ["#d55e00", "#0072b2", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000", "#8c564b", "#7f7f7f",
           "#bcbd22", "#17becf", "#9467bd", "#f0e442"]
_PANELS = [("negative", "predicted"), ("negative", "target"), ("positive", "predicted"), ("positive", "target")]


def perturbation_plot(results: dict, title: str, panel: tuple[int, int] = (420, 300)) -> Image.Image:
    """Four panels (negative/positive perturbation × predicted/target class): top-1 accuracy against
    the share of pixels removed, one line per method, starting from the unperturbed accuracy; a legend
    with each curve's AUC."""
    font = ImageFont.load_default()
    methods = results["methods"]
    width, height = panel
    margin_left, margin_bottom, margin_top = 48, 36, 26
    legend_width = 300
    canvas = Image.new("RGB", (2 * width + legend_width, 2 * height + 30), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((10, 8), title, fill="black", font=font)
    xs = [0.0] + list(results["fractions"])
    for index, (mode, which) in enumerate(_PANELS):
        left, top = (index % 2) * width, 30 + (index // 2) * height
        plot = (left + margin_left, top + margin_top, left + width - 14, top + height - margin_bottom)
        better = "higher" if mode == "negative" else "lower"
        draw.text((plot[0], top + 6), f"{mode} perturbation, {which} class ({better} AUC is better)", fill="black",
                  font=font)
        draw.rectangle(plot, outline="#444444")
        for tick in range(0, 101, 20):
            y = plot[3] - (plot[3] - plot[1]) * tick / 100
            draw.line((plot[0], y, plot[2], y), fill="#e5e5e5")
            draw.text((plot[0] - 26, y - 6), f"{tick}", fill="#444444", font=font)
        for tick in range(0, 91, 10):
            x = plot[0] + (plot[2] - plot[0]) * tick / 90
            draw.line((x, plot[3], x, plot[3] + 3), fill="#444444")
            draw.text((x - 6, plot[3] + 6), f"{tick}", fill="#444444", font=font)
        draw.text((plot[0] + (plot[2] - plot[0]) // 2 - 50, plot[3] + 20), "% of pixels removed", fill="#444444",
                  font=font)
        for colour, entry in zip(PALETTE * 2, methods.values()):
            curve = [results["clean_accuracy"]] + entry["perturbation"][mode][which]["accuracy"]
            points = [(plot[0] + (plot[2] - plot[0]) * x / 0.9, plot[3] - (plot[3] - plot[1]) * y / 100)
                      for x, y in zip(xs, curve)]
            draw.line(points, fill=colour, width=2)
            for x, y in points:
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    left = 2 * width + 10
    draw.text((left, 40), "method: AUC neg pred / target, pos pred / target", fill="black", font=font)
    for row, ((name, entry), colour) in enumerate(zip(methods.items(), PALETTE * 2)):
        y = 62 + row * 18
        draw.line((left, y + 6, left + 22, y + 6), fill=colour, width=3)
        aucs = [entry["perturbation"][m][w]["auc"] for m, w in _PANELS]
        draw.text((left + 28, y), f"{name}: {aucs[0]:.1f}/{aucs[1]:.1f}, {aucs[2]:.1f}/{aucs[3]:.1f}", fill="black",
                  font=font)
    return canvas


# -- heatmap overlays -------------------------------------------------------------------------

#: Colour maps for signed heatmaps in [−1, 1]: control points (value, RGB) joined linearly; values
#: beyond ±1 saturate. Positive = evidence for the explained class, negative = against.
COLOUR_MAPS: dict[str, list[tuple[float, tuple[int, int, int]]]] = {
    # ColorBrewer RdYlBu, warm for evidence: hue and lightness both change, so the strength of the
    # evidence reads on any photo (under the greyed photo of the overlays)
    "rdylbu": [(-1.0, (49, 54, 149)), (-0.5, (116, 173, 209)), (0.0, (255, 255, 191)), (0.5, (244, 109, 67)),
               (1.0, (165, 0, 38))],
    # the plain diverging map of agf-onnx ≤ 0.x: white at 0, red (204, 0, 0) at +1, blue (0, 51, 204) at −1
    "bwr": [(-1.0, (0, 51, 204)), (0.0, (255, 255, 255)), (1.0, (204, 0, 0))],
    # ColorBrewer PiYG (green against, magenta for): safe for red–green colour blindness
    "piyg": [(-1.0, (39, 100, 25)), (-0.5, (127, 188, 65)), (0.0, (247, 247, 247)), (0.5, (222, 119, 174)),
             (1.0, (142, 1, 82))],
    # Google's Turbo sampled at nine points (pytorch-grad-cam's jet, perceptually smoother), −1 → 1
    "turbo": [(-1.0, (48, 18, 59)), (-0.75, (70, 107, 227)), (-0.5, (40, 187, 236)), (-0.25, (49, 242, 153)),
              (0.0, (162, 252, 60)), (0.25, (237, 208, 58)), (0.5, (251, 128, 34)), (0.75, (209, 49, 5)),
              (1.0, (122, 4, 3))],
}
DEFAULT_COLOUR_MAP = "rdylbu"
#: The shortest side of an overlay panel, in pixels: smaller maps (a 32×32 or 64×64 model) are
#: enlarged by a whole factor (nearest neighbour: each map pixel stays a visible square).
MIN_PANEL = 192
_GAP, _BAR, _LINE = 6, 14, 16


def colour_map(values: np.ndarray, name: str = DEFAULT_COLOUR_MAP) -> np.ndarray:
    """Signed values → RGB uint8 ``[..., 3]`` by the colour map ``name`` (``COLOUR_MAPS``)."""
    if name not in COLOUR_MAPS:
        raise ValueError(f"unknown colour map '{name}' (available: {', '.join(COLOUR_MAPS)})")
    points = COLOUR_MAPS[name]
    positions = [p for p, _ in points]
    clipped = np.clip(np.nan_to_num(np.asarray(values, np.float64)), -1.0, 1.0)
    rgb = np.stack([np.interp(clipped, positions, [c[k] for _, c in points]) for k in range(3)], -1)
    return rgb.round().astype(np.uint8)


def greyed(photo: np.ndarray) -> np.ndarray:
    """The photo as mid-contrast grey (ITU-R 601 luma mapped to 40…218): under an overlay, the
    map's colours then never meet the same colour in the photo (red evidence on a red car)."""
    luma = photo[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.repeat((40.0 + luma * (178.0 / 255.0))[..., None], 3, -1).round().astype(np.uint8)


def blend(photo: np.ndarray, heatmap: np.ndarray, opacity: float = 0.7, cmap: str = "bwr",
          grey: bool = False) -> np.ndarray:
    """The photo (``grey``: ``greyed``) with the colour-mapped heatmap over it; the map's weight is
    ``opacity`` × |value| (clipped to 1), so the photo shows where the map is near 0."""
    base = greyed(photo) if grey else photo
    weight = (np.clip(np.abs(np.nan_to_num(heatmap)), 0.0, 1.0) * opacity)[..., None]
    mixed = (1 - weight) * base.astype(np.float64) + weight * colour_map(heatmap, cmap).astype(np.float64)
    return mixed.round().astype(np.uint8)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # a scalable font where Pillow has FreeType
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _fitted(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def title_height() -> int:
    """The height of the two title lines above the panels of ``overlay_figure``."""
    return 2 * _LINE + 6


def panel_left(index: int, tile_width: int) -> int:
    """The left edge of panel ``index`` (0: the photo) of ``overlay_figure``; ``index`` = the number of
    panels gives where the colour bar's margin starts."""
    return _GAP + index * (tile_width + _GAP)


def panel_scale(height: int, width: int, min_panel: int = MIN_PANEL) -> int:
    """The whole factor that brings the shorter side of a ``height × width`` panel to ``min_panel`` (≥ 1)."""
    return max(1, -(-min_panel // max(1, min(height, width))))


def overlay_figure(photo: np.ndarray, heatmaps: Sequence[np.ndarray], titles: Sequence[tuple[str, str]],
                   cmap: str = DEFAULT_COLOUR_MAP, min_panel: int = MIN_PANEL) -> Image.Image:
    """The photo, then one overlay per heatmap (over the greyed photo), each panel under a two-line
    title (``titles``: class name, probability and the map's range), and a colour bar with its scale.

    Panels smaller than ``min_panel`` are enlarged by a whole factor (``panel_scale``); the photo
    keeps its colours in the first panel.
    """
    height, width = photo.shape[:2]
    scale = panel_scale(height, width, min_panel)
    tile_w, tile_h = width * scale, height * scale
    font = _font(13)
    line, top = _LINE, title_height()
    bar_left = panel_left(1 + len(heatmaps), tile_w) + 4
    canvas = Image.new("RGB", (bar_left + _BAR + 52, top + tile_h + _GAP), "white")
    draw = ImageDraw.Draw(canvas)

    def enlarged(pixels: np.ndarray) -> Image.Image:
        return Image.fromarray(pixels).resize((tile_w, tile_h), Image.NEAREST)

    panels = [(photo, ("input", f"{width}x{height} as the model saw it"))]
    panels += [(blend(photo, heatmap, cmap=cmap, grey=True), title) for heatmap, title in zip(heatmaps, titles)]
    for index, (pixels, (first, second)) in enumerate(panels):
        left = panel_left(index, tile_w)
        draw.text((left, 3), _fitted(draw, first, font, tile_w), fill="black", font=font)
        draw.text((left, 3 + line), _fitted(draw, second, font, tile_w), fill="#444444", font=font)
        canvas.paste(enlarged(pixels), (left, top))
    # the colour bar: +1 at the top, −1 at the bottom, the scale every overlay uses
    values = np.linspace(1.0, -1.0, tile_h)[:, None].repeat(_BAR, 1)
    canvas.paste(Image.fromarray(colour_map(values, cmap)), (bar_left, top))
    draw.rectangle((bar_left - 1, top - 1, bar_left + _BAR, top + tile_h), outline="#444444")
    small = _font(11)
    for value, label, below in ((1.0, "+1", "for"), (0.0, "0", None), (-1.0, "-1", "against")):
        y = top + round((1.0 - value) / 2.0 * (tile_h - 1))
        draw.line((bar_left + _BAR, y, bar_left + _BAR + 3, y), fill="#444444")
        y = min(max(y - 6, top), top + tile_h - 12)
        draw.text((bar_left + _BAR + 6, y), label, fill="#444444", font=small)
        if below is not None:  # the word on the side of the bar's inside
            draw.text((bar_left + _BAR + 6, y + (13 if value > 0 else -13)), below, fill="#444444", font=small)
    draw.text((bar_left - 2, top - line - 2), "map / max", fill="#444444", font=small)
    return canvas
