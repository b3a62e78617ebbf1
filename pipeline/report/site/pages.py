"""HTML of the site's pages: plain strings, escaped, with relative links only (file:// works).

Every number a page shows also sits in a data-value attribute at full precision, so a reader
(or a test) can take the exact value; charts are inline SVG drawn here, so a page shows its
content without JavaScript. The scripts (assets/site.js, the vendored panzoom) add zooming,
search and the layered graph.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

ASSETS = "assets"
POSITIVE = (235, 110, 20)   # token shading of positive activations (orange)
NEGATIVE = (40, 110, 235)   # and of negative ones (blue)


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value, digits: int = 3) -> str:
    """A number for reading: ints with separators, floats with `digits` significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        a = abs(value)
        if a == 0:
            return "0"
        if a < 10 ** -digits or a >= 1e6:
            return f"{value:.{max(digits - 1, 1)}e}"
        if a >= 10 ** digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def cell(value, text: str | None = None, cls: str = "num") -> str:
    """A table cell carrying the exact value in data-value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f'<td class="{cls}">–</td>'
    shown = fmt(value) if text is None else text
    return f'<td class="{cls}" data-value="{esc(repr(value) if isinstance(value, float) else value)}">' \
        f"{esc(shown) if text is None else shown}</td>"


def table(headers: Sequence[str], rows: Iterable[str], *, cls: str = "", attrs: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(rows)
    return f'<table class="{cls}" {attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def missing(text: str, command: str | None = None) -> str:
    """A section's sentence when its tables are empty, with the command that fills them."""
    cmd = f" Run <code>{esc(command)}</code>." if command else ""
    return f'<p class="missing">{esc(text)}.{cmd}</p>'


def link(href: str | None, text: str) -> str:
    return f'<a href="{esc(href)}">{esc(text)}</a>' if href else esc(text)


@dataclass
class Nav:
    """The site's top-level pages that exist, for the bar on every page."""

    items: list[tuple[str, str]] = field(default_factory=list)  # (file, label)


def page(title: str, body: str, *, depth: int, nav: Nav, scripts: Sequence[str] = (),
         data: dict | None = None) -> str:
    """A whole page: head, navigation bar, body; `depth` folders below the site root."""
    root = "../" * depth
    bar = "".join(f'<a href="{root}{esc(f)}">{esc(label)}</a>' for f, label in nav.items)
    blobs = "" if data is None else "".join(
        f'<script type="application/json" id="{esc(k)}">{_json(v)}</script>'
        for k, v in data.items())
    extra = "".join(f'<script src="{root}{esc(s)}"></script>' for s in scripts)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{root}{ASSETS}/site.css">
</head><body>
<nav class="bar">{bar}</nav>
<main>
<h1>{esc(title)}</h1>
{body}
</main>
{blobs}{extra}<script src="{root}{ASSETS}/panzoom.min.js"></script>
<script src="{root}{ASSETS}/site.js"></script>
</body></html>
"""


def _json(value) -> str:
    # inside <script>: "</" would close the element
    return json.dumps(value, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")


def figure(src: str, caption: str, *, dark: bool = False, zoom: bool = True) -> str:
    """A full-width figure; zoomable (drag to pan, Shift + wheel or double-click to zoom)."""
    img = f'<img src="{esc(src)}" alt="{esc(caption)}" draggable="false">'
    inner = f'<div class="zoom">{img}</div>' if zoom else img
    return (f'<figure class="{"dark" if dark else ""}">{inner}'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


# -- tokens shaded by activation (Neuronpedia style)


def shade(value: float | None, scale: float) -> str:
    if value is None or not math.isfinite(value) or scale <= 0:
        return ""
    alpha = min(1.0, abs(value) / scale)
    r, g, b = POSITIVE if value >= 0 else NEGATIVE
    return f"background:rgba({r},{g},{b},{alpha:.3f})"


def token_span(text: str, value: float | None, scale: float, *, center: bool = False) -> str:
    shown = text.replace("\n", "↵").replace("\t", "⇥")
    title = "" if value is None else f' title="{value:.4g}" data-value="{value!r}"'
    cls = "tok ctr" if center else "tok"
    return f'<span class="{cls}" style="{shade(value, scale)}"{title}>{esc(shown)}</span>'


def example_line(context, row: int, scale: float) -> str:
    return "".join(token_span(text, value, scale, center=r == row) for r, text, value in context)


def shading_legend(scale: float) -> str:
    return (f'<p class="legend"><span class="tok swatch" style="{shade(scale, scale)}">orange'
            f'</span> positive activation, <span class="tok swatch" style="{shade(-scale, scale)}">'
            f"blue</span> negative; full colour at |a| = {fmt(scale)}; the example's own token "
            "is outlined; hover a token for its value.</p>")


# -- inline SVG charts


def svg_histogram(edges: Sequence[float], counts: Sequence[int], *, width: int = 900,
                  height: int = 260, log: bool = True, xlabel: str = "activation") -> str:
    """Bars of a histogram; y on a log scale (count + 1) by default."""
    n = len(counts)
    if not n:
        return ""
    pad_l, pad_b, pad_t = 60, 40, 10
    w, h = width - pad_l - 10, height - pad_b - pad_t
    ys = [math.log10(c + 1) if log else c for c in counts]
    top = max(ys) or 1
    bw = w / n
    bars = []
    for k, (c, y) in enumerate(zip(counts, ys)):
        bh = h * y / top
        bars.append(f'<rect x="{pad_l + k * bw:.1f}" y="{pad_t + h - bh:.1f}" '
                    f'width="{max(bw - 1, 0.5):.1f}" height="{bh:.1f}" class="bar">'
                    f"<title>[{edges[k]:.4g}, {edges[k + 1]:.4g}): {c:,}</title></rect>")
    ticks = []
    for frac in (0, 0.25, 0.5, 0.75, 1):
        x = pad_l + frac * w
        v = edges[0] + frac * (edges[-1] - edges[0])
        ticks.append(f'<text x="{x:.1f}" y="{height - 22}" class="tick" '
                     f'text-anchor="middle">{v:.3g}</text>')
    ylab = "rows (log scale)" if log else "rows"
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" '
            f'data-counts="{",".join(str(int(c)) for c in counts)}" '
            f'data-edges="{",".join(repr(float(e)) for e in edges)}">'
            f'{"".join(bars)}{"".join(ticks)}'
            f'<text x="{pad_l + w / 2:.0f}" y="{height - 4}" class="label" '
            f'text-anchor="middle">{esc(xlabel)}</text>'
            f'<text x="14" y="{pad_t + h / 2:.0f}" class="label" text-anchor="middle" '
            f'transform="rotate(-90 14 {pad_t + h / 2:.0f})">{ylab}</text>'
            f'<text x="{pad_l - 6}" y="{pad_t + 10}" class="tick" text-anchor="end">'
            f"{max(counts):,}</text></svg>")


def svg_line(labels: Sequence[str], values: Sequence[float], *, threshold: float | None = None,
             width: int = 900, height: int = 240, ylabel: str = "") -> str:
    """A line over categorical x (checkpoints), with an optional horizontal threshold."""
    n = len(values)
    if not n:
        return ""
    pad_l, pad_b, pad_t = 60, 50, 12
    w, h = width - pad_l - 20, height - pad_b - pad_t
    top = max([v for v in values if v is not None] + [threshold or 0, 1e-9]) * 1.1
    xs = [pad_l + (w * k / (n - 1) if n > 1 else w / 2) for k in range(n)]
    ys = [pad_t + h - h * (v or 0) / top for v in values]
    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" class="dot"><title>{esc(lab)}: '
                   f"{v:.4g}</title></circle>" for x, y, v, lab in zip(xs, ys, values, labels))
    xt = "".join(f'<text x="{x:.1f}" y="{height - 30}" class="tick" text-anchor="middle">'
                 f"{esc(lab)}</text>" for x, lab in zip(xs, labels))
    line = ""
    if threshold is not None:
        ty = pad_t + h - h * threshold / top
        line = (f'<line x1="{pad_l}" x2="{pad_l + w}" y1="{ty:.1f}" y2="{ty:.1f}" '
                f'class="threshold"/><text x="{pad_l + w}" y="{ty - 4:.1f}" class="tick" '
                f'text-anchor="end">dormant at or below {threshold:g}</text>')
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%">{line}'
            f'<polyline points="{points}" class="line"/>{dots}{xt}'
            f'<text x="14" y="{pad_t + h / 2:.0f}" class="label" text-anchor="middle" '
            f'transform="rotate(-90 14 {pad_t + h / 2:.0f})">{esc(ylabel)}</text>'
            f'<text x="{pad_l - 6}" y="{pad_t + 10}" class="tick" text-anchor="end">'
            f"{top:.3g}</text></svg>")
