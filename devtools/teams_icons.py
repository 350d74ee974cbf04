"""Draws the Teams app's two icons (appPackage/color.png, outline.png); run once, commit the files.

Teams wants a 192x192 full-colour icon and a 32x32 outline icon, white on transparent. Both show
a speech bubble with three lines of text: a chat that keeps what was said.
`python -m devtools.teams_icons` redraws them (Pillow, from requirements-dev.txt).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
ACCENT = (38, 87, 163, 255)  # the manifest's accentColor, #2657A3
WHITE = (255, 255, 255, 255)


def _bubble(draw: ImageDraw.ImageDraw, scale: float, *, width: int, fill: bool) -> None:
    """A speech bubble with a tail and three text lines, drawn on a 32-unit grid times `scale`."""
    def box(*points: float) -> list[float]:
        return [p * scale for p in points]

    outline = None if fill else WHITE
    draw.rounded_rectangle(box(4, 5, 28, 22), radius=4 * scale, outline=WHITE,
                           fill=WHITE if fill else None, width=width)
    draw.polygon(box(9, 21, 9, 28, 15, 21), fill=WHITE, outline=outline)
    ink = ACCENT if fill else WHITE
    for y, end in ((10, 23), (13.5, 23), (17, 18)):
        draw.line(box(9, y, end, y), fill=ink, width=max(1, round(1.6 * scale)))


def draw_color(size: int = 192) -> Image.Image:
    image = Image.new("RGBA", (size, size), ACCENT)
    _bubble(ImageDraw.Draw(image), size / 32 * 0.8, width=1, fill=True)
    return image.transform(image.size, Image.Transform.AFFINE,
                           (1, 0, -size * 0.1, 0, 1, -size * 0.1), fillcolor=ACCENT)


def draw_outline(size: int = 32) -> Image.Image:
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    _bubble(ImageDraw.Draw(image), size / 32, width=2, fill=False)
    return image


def main() -> None:
    draw_color().save(ROOT / "appPackage" / "color.png", optimize=True)
    draw_outline().save(ROOT / "appPackage" / "outline.png", optimize=True)


if __name__ == "__main__":
    main()
