"""Perturbation curves drawn with Pillow (no plotting library needed by the package)."""

from __future__ import annotations

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
