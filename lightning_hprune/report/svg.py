"""The report's four figures as SVG text, drawn in pure Python (no matplotlib): milliseconds, not seconds.

They show the same panels, series and marks as the matplotlib figures of
:mod:`lightning_hprune.report.figures` (which are drawn only when a raster image is needed: a logger's image
API, or PNG files asked for), from the same plain data. This is what ``pruning_report.html`` embeds and
what ``hprune_<figure>.svg`` holds.

Every data series is a ``<g class="series">`` whose ``data-label``, ``data-x`` and ``data-y`` attributes
carry the plotted values (space-separated), and every heat-map cell a ``<rect class="cell">`` with its
layer, column and kept fraction, so the figures can be read back and checked.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

from lightning_hprune.report.figures import (
    _COLORS,
    _MARKERS,
    _cost_points,
    _cost_steps,
    _decision_marks,
    _hierarchy_layout,
    _kept_events,
    _label,
    _last_epoch,
    _latency_points,
    _latency_title,
    _metric_checks,
    _metric_points,
    _rollback_epochs,
    _scale,
    each_figure,
)

_FONT = "DejaVu Sans, Verdana, Segoe UI, Helvetica, Arial, sans-serif"
#: viridis at 0, 0.1, ..., 1 (interpolated linearly in between).
_VIRIDIS = (
    (0x44, 0x01, 0x54),
    (0x48, 0x24, 0x75),
    (0x41, 0x44, 0x87),
    (0x35, 0x5F, 0x8D),
    (0x2A, 0x78, 0x8E),
    (0x21, 0x91, 0x8C),
    (0x22, 0xA8, 0x84),
    (0x44, 0xBF, 0x70),
    (0x7A, 0xD1, 0x51),
    (0xBD, 0xDF, 0x26),
    (0xFD, 0xE7, 0x25),
)


def viridis(v: float) -> str:
    """The viridis colour of ``v`` in [0, 1] as ``#rrggbb``."""
    v = min(max(v, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(v), len(_VIRIDIS) - 2)
    t = v - i
    rgb = (round(a + (b - a) * t) for a, b in zip(_VIRIDIS[i], _VIRIDIS[i + 1], strict=True))
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _num(v: float) -> str:
    """A coordinate, short."""
    return f"{v:.1f}".rstrip("0").rstrip(".") if math.isfinite(v) else "0"


def _val(v: float) -> str:
    """A data value for a ``data-*`` attribute (``nan`` when missing)."""
    return repr(float(v)) if math.isfinite(v) else "nan"


def _esc(text: str) -> str:
    return escape(text, quote=True)


def text_width(text: str, size: float) -> float:
    """Rough width of ``text`` in pixels at font ``size`` (sans-serif, about 0.6 em per character)."""
    return 0.6 * size * max((len(line) for line in text.split("\n")), default=0)


def nice_ticks(lo: float, hi: float, n: int = 7) -> tuple[list[float], int]:
    """About ``n`` round tick values in ``[lo, hi]`` (steps of 1, 2, 2.5 or 5 times a power of ten) and the decimals to print."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else [], 0
    raw = (hi - lo) / max(n, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = mag
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * mag >= raw * (1 - 1e-9):
            step = m * mag
            break
    start = math.ceil(lo / step - 1e-9)
    ticks = []
    k = start
    while k * step <= hi + 1e-9 * step:
        ticks.append(k * step)
        k += 1
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if abs(round(step / mag) - step / mag) > 1e-9:  # 2.5 x 10^k
        decimals += 1
    return ticks, decimals


def _fmt_tick(v: float, decimals: int) -> str:
    s = f"{v:.{decimals}f}"
    return "0" if s.strip("-0.") == "" else s


def _marker(shape: str, x: float, y: float, size: float, color: str, hollow: bool = False) -> str:
    """One marker (matplotlib's ``o . ^ X s D *``) centred on ``(x, y)``; ``size`` is its diameter."""
    r = size / 2
    fill = "none" if hollow else color
    style = f"fill='{fill}' stroke='{color}' stroke-width='1.2'"
    if shape == ".":
        return f"<circle cx='{_num(x)}' cy='{_num(y)}' r='{_num(max(r * 0.5, 1.5))}' fill='{color}'/>"
    if shape == "s":
        return (
            f"<rect x='{_num(x - r)}' y='{_num(y - r)}' width='{_num(size)}' height='{_num(size)}' {style}/>"
        )
    if shape == "^":
        pts = [(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)]
    elif shape == "D":
        pts = [(x, y - r), (x + r * 0.75, y), (x, y + r), (x - r * 0.75, y)]
    elif shape == "X":
        a, b = r, r * 0.35
        pts = [
            (x - a, y - a + b),
            (x - a + b, y - a),
            (x, y - b),
            (x + a - b, y - a),
            (x + a, y - a + b),
            (x + b, y),
            (x + a, y + a - b),
            (x + a - b, y + a),
            (x, y + b),
            (x - a + b, y + a),
            (x - a, y + a - b),
            (x - b, y),
        ]
    elif shape == "*":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.42
            ang = -math.pi / 2 + i * math.pi / 5
            pts.append((x + rad * math.cos(ang), y + rad * math.sin(ang)))
    else:
        return f"<circle cx='{_num(x)}' cy='{_num(y)}' r='{_num(r)}' {style}/>"
    points = " ".join(f"{_num(px)},{_num(py)}" for px, py in pts)
    return f"<polygon points='{points}' {style}/>"


def _dash(ls: str | None, lw: float) -> str:
    if ls == "--":
        return f" stroke-dasharray='{_num(3.7 * lw)},{_num(1.6 * lw)}'"
    if ls == ":":
        return f" stroke-dasharray='{_num(max(lw, 1))},{_num(1.65 * max(lw, 1))}'"
    return ""


@dataclass
class _Item:
    kind: str
    xs: list[float]
    ys: list[float]
    style: dict[str, Any] = field(default_factory=dict)


@dataclass
class Panel:
    """One set of axes: its plot area in pixels, what it draws in data coordinates, its labels and legend.

    Limits come from the data (5 % margins, like matplotlib's) unless set; ``ybottom`` fixes the lower
    y limit; ``invert_x`` runs the x axis from right to left.
    """

    x0: float
    y0: float
    w: float
    h: float
    title: str = ""
    xlabel: str = ""
    ylabel: str = ""
    invert_x: bool = False
    ybottom: float | None = None
    xlim: tuple[float, float] | None = None
    ylim: tuple[float, float] | None = None
    right: bool = False  # a twin axis: y ticks on the right, no frame or grid of its own
    ycolor: str = "#222222"
    title_size: float = 13.5
    show_xticks: bool = True
    items: list[_Item] = field(default_factory=list)
    legend: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    note: str = ""
    legend_size: float = 9.5

    # ------------------------------------------------------------------ what to draw
    def _add(
        self, kind: str, xs: Sequence[float], ys: Sequence[float], label: str | None, **style: Any
    ) -> None:
        self.items.append(
            _Item(kind, [float(v) for v in xs], [float(v) for v in ys], {**style, "label": label})
        )
        if label:
            self.legend.append((label, {"kind": kind, **style}))

    def line(
        self,
        xs: Sequence[float],
        ys: Sequence[float],
        color: str,
        lw: float = 1.5,
        ls: str | None = None,
        marker: str | None = None,
        ms: float = 5.0,
        label: str | None = None,
        step: bool = False,
    ) -> None:
        """A polyline (``step``: horizontal then vertical, matplotlib's ``where="post"``), markers optional."""
        self._add("line", xs, ys, label, color=color, lw=lw, ls=ls, marker=marker, ms=ms, step=step)

    def points(
        self,
        xs: Sequence[float],
        ys: Sequence[float],
        marker: str,
        color: str,
        ms: float = 6.0,
        label: str | None = None,
        hollow: bool = False,
    ) -> None:
        """Markers only."""
        self._add("points", xs, ys, label, color=color, marker=marker, ms=ms, hollow=hollow)

    def hline(
        self, y: float, color: str, lw: float = 1.0, ls: str | None = None, label: str | None = None
    ) -> None:
        """A horizontal line across the axes."""
        self._add("hline", [], [y], label, color=color, lw=lw, ls=ls)

    def vline(
        self,
        x: float,
        color: str,
        lw: float = 1.0,
        ls: str | None = None,
        label: str | None = None,
        opacity: float = 1.0,
    ) -> None:
        """A vertical line across the axes."""
        self._add("vline", [x], [], label, color=color, lw=lw, ls=ls, opacity=opacity)

    def errorbar(
        self,
        x: float,
        median: float,
        q1: float,
        q3: float,
        marker: str,
        color: str,
        ms: float = 6.0,
        label: str | None = None,
        hollow: bool = False,
    ) -> None:
        """A marker at the median with a bar (and caps) from ``q1`` to ``q3``."""
        self._add(
            "errorbar", [x, x, x], [median, q1, q3], label, color=color, marker=marker, ms=ms, hollow=hollow
        )

    def bars(
        self, xs: Sequence[float], heights: Sequence[float], colors: Sequence[str], width: float
    ) -> None:
        """Vertical bars from 0, centred on ``xs``."""
        self._add(
            "bars",
            [*xs, *[x - width / 2 for x in xs], *[x + width / 2 for x in xs]],
            [0.0, *heights],
            None,
            colors=list(colors),
        )

    def annotate(self, x: float, y: float, text: str, dx: float = 4, dy: float = -5, size: float = 8) -> None:
        """``text`` at ``(x, y)`` shifted by ``(dx, dy)`` pixels."""
        self.items.append(_Item("text", [x], [y], {"text": text, "dx": dx, "dy": dy, "size": size}))

    # ------------------------------------------------------------------ limits and coordinates
    def _data(self, axis: str) -> list[float]:
        out: list[float] = []
        for it in self.items:
            if it.kind == "bars":
                n = (len(it.xs)) // 3
                vals = it.xs[n:] if axis == "x" else it.ys
            elif axis == "x":
                vals = it.xs if it.kind != "hline" else []
            else:
                vals = it.ys if it.kind != "vline" else []
            out.extend(v for v in vals if math.isfinite(v))
        return out

    def _limits(self, axis: str) -> tuple[float, float]:
        fixed = self.xlim if axis == "x" else self.ylim
        if fixed is not None:
            return fixed
        data = self._data(axis)
        if not data:
            lo, hi = 0.0, 1.0
        else:
            lo, hi = min(data), max(data)
            if hi == lo:
                pad = abs(lo) * 0.05 or 0.5
                lo, hi = lo - pad, hi + pad
            else:
                pad = 0.05 * (hi - lo)
                lo, hi = lo - pad, hi + pad
        if axis == "y" and self.ybottom is not None:
            lo = self.ybottom
            if hi <= lo:
                hi = lo + 1.0
        return lo, hi

    def _setup(self) -> None:
        self._xl = self._limits("x")
        self._yl = self._limits("y")

    def px(self, x: float) -> float:
        """Pixel x of data ``x``."""
        lo, hi = self._xl
        f = (x - lo) / (hi - lo)
        return self.x0 + self.w * (1 - f if self.invert_x else f)

    def py(self, y: float) -> float:
        """Pixel y of data ``y``."""
        lo, hi = self._yl
        return self.y0 + self.h * (1 - (y - lo) / (hi - lo))

    # ------------------------------------------------------------------ drawing
    def render(self, clip_id: str) -> str:
        """The panel as SVG elements."""
        self._setup()
        out: list[str] = []
        x0, y0, w, h = self.x0, self.y0, self.w, self.h
        xlo, xhi = sorted(self._xl)
        xt, xd = nice_ticks(xlo, xhi)
        yt, yd = nice_ticks(*self._yl)
        if not self.right:
            out.append(
                f"<rect x='{_num(x0)}' y='{_num(y0)}' width='{_num(w)}' height='{_num(h)}' fill='white'/>"
            )
            grid = []
            for v in xt:
                p = self.px(v)
                grid.append(f"M{_num(p)},{_num(y0)}V{_num(y0 + h)}")
            for v in yt:
                p = self.py(v)
                grid.append(f"M{_num(x0)},{_num(p)}H{_num(x0 + w)}")
            if grid:
                out.append(
                    f"<path class='grid' d='{''.join(grid)}' stroke='#b0b0b0' stroke-opacity='0.45' stroke-width='0.8' fill='none'/>"
                )
        out.append(
            f"<clipPath id='{clip_id}'><rect x='{_num(x0)}' y='{_num(y0)}' width='{_num(w)}' height='{_num(h)}'/></clipPath>"
        )
        out.append(f"<g clip-path='url(#{clip_id})'>")
        for it in self.items:
            out.append(self._item(it))
        out.append("</g>")
        if self.note:
            out.append(
                f"<text x='{_num(x0 + w / 2)}' y='{_num(y0 + h / 2)}' text-anchor='middle' "
                f"dominant-baseline='middle' font-size='11'>{_esc(self.note)}</text>"
            )
        out.append(self._axes(xt, xd, yt, yd))
        if self.legend:
            out.append(self._legend())
        return "\n".join(out)

    def _item(self, it: _Item) -> str:
        s = it.style
        label = _esc(str(s.get("label") or ""))
        data = f" data-label='{label}' data-x='{' '.join(map(_val, it.xs))}' data-y='{' '.join(map(_val, it.ys))}'"
        x0, y0, w, h = self.x0, self.y0, self.w, self.h
        if it.kind == "line":
            pts = [
                (self.px(x), self.py(y))
                for x, y in zip(it.xs, it.ys, strict=True)
                if math.isfinite(x) and math.isfinite(y)
            ]
            path = []
            for i, (px, py) in enumerate(pts):
                if i == 0:
                    path.append(f"M{_num(px)},{_num(py)}")
                elif s["step"]:
                    path.append(f"H{_num(px)}V{_num(py)}")
                else:
                    path.append(f"L{_num(px)},{_num(py)}")
            body = [
                f"<path d='{''.join(path)}' fill='none' stroke='{s['color']}' stroke-width='{_num(s['lw'])}'"
                f"{_dash(s['ls'], s['lw'])} stroke-linejoin='round'/>"
            ]
            if s["marker"]:
                body += [_marker(s["marker"], px, py, s["ms"], s["color"]) for px, py in pts]
            return f"<g class='series'{data}>{''.join(body)}</g>"
        if it.kind == "points":
            body = [
                _marker(s["marker"], self.px(x), self.py(y), s["ms"], s["color"], s.get("hollow", False))
                for x, y in zip(it.xs, it.ys, strict=True)
                if math.isfinite(x) and math.isfinite(y)
            ]
            return f"<g class='series'{data}>{''.join(body)}</g>"
        if it.kind == "hline":
            p = self.py(it.ys[0])
            return (
                f"<g class='series'{data}><path d='M{_num(x0)},{_num(p)}H{_num(x0 + w)}' stroke='{s['color']}' "
                f"stroke-width='{_num(s['lw'])}'{_dash(s['ls'], s['lw'])}/></g>"
            )
        if it.kind == "vline":
            p = self.px(it.xs[0])
            return (
                f"<g class='series'{data}><path d='M{_num(p)},{_num(y0)}V{_num(y0 + h)}' stroke='{s['color']}' "
                f"stroke-opacity='{s['opacity']}' stroke-width='{_num(s['lw'])}'{_dash(s['ls'], s['lw'])}/></g>"
            )
        if it.kind == "errorbar":
            x, (med, q1, q3) = it.xs[0], it.ys
            px, top, bottom = self.px(x), self.py(q3), self.py(q1)
            c = s["color"]
            return (
                f"<g class='series'{data}><path d='M{_num(px)},{_num(bottom)}V{_num(top)}M{_num(px - 4)},{_num(top)}"
                f"H{_num(px + 4)}M{_num(px - 4)},{_num(bottom)}H{_num(px + 4)}' stroke='{c}' stroke-width='1.3'/>"
                + _marker(s["marker"], px, self.py(med), s["ms"], c, s.get("hollow", False))
                + "</g>"
            )
        if it.kind == "bars":
            n = len(it.xs) // 3
            body = []
            for i in range(n):
                left, right_ = self.px(it.xs[n + i]), self.px(it.xs[2 * n + i])
                top, base = self.py(it.ys[1 + i]), self.py(0.0)
                body.append(
                    f"<rect x='{_num(min(left, right_))}' y='{_num(min(top, base))}' width='{_num(abs(right_ - left))}' "
                    f"height='{_num(abs(base - top))}' fill='{s['colors'][i]}' fill-opacity='0.6'/>"
                )
            return f"<g class='series' data-label='bars' data-x='{' '.join(map(_val, it.xs[:n]))}' data-y='{' '.join(map(_val, it.ys[1:]))}'>{''.join(body)}</g>"
        if it.kind == "text":
            return (
                f"<text x='{_num(self.px(it.xs[0]) + s['dx'])}' y='{_num(self.py(it.ys[0]) + s['dy'])}' "
                f"font-size='{_num(s['size'])}'>{_esc(s['text'])}</text>"
            )
        return ""

    def _axes(self, xt: list[float], xd: int, yt: list[float], yd: int) -> str:
        x0, y0, w, h = self.x0, self.y0, self.w, self.h
        out = []
        if not self.right:
            out.append(
                f"<rect x='{_num(x0)}' y='{_num(y0)}' width='{_num(w)}' height='{_num(h)}' fill='none' stroke='#222' stroke-width='0.8'/>"
            )
            if self.show_xticks:
                for v in xt:
                    p = self.px(v)
                    out.append(f"<path d='M{_num(p)},{_num(y0 + h)}v3.5' stroke='#222' stroke-width='0.8'/>")
                    out.append(
                        f"<text x='{_num(p)}' y='{_num(y0 + h + 16)}' text-anchor='middle' font-size='11'>{_fmt_tick(v, xd)}</text>"
                    )
            if self.xlabel:
                out.append(
                    f"<text class='xlabel' x='{_num(x0 + w / 2)}' y='{_num(y0 + h + 34)}' text-anchor='middle' font-size='12'>{_esc(self.xlabel)}</text>"
                )
        side = x0 + w if self.right else x0
        sign = 1 if self.right else -1
        for v in yt:
            p = self.py(v)
            out.append(
                f"<path d='M{_num(side)},{_num(p)}h{_num(3.5 * sign)}' stroke='{self.ycolor}' stroke-width='0.8'/>"
            )
            out.append(
                f"<text x='{_num(side + 6 * sign)}' y='{_num(p + 3.5)}' text-anchor='{'start' if self.right else 'end'}' "
                f"font-size='11' fill='{self.ycolor}'>{_fmt_tick(v, yd)}</text>"
            )
        if self.ylabel:
            widest = max((text_width(_fmt_tick(v, yd), 11) for v in yt), default=0)
            lx = side + sign * (widest + 14)
            out.append(
                f"<text class='ylabel' x='{_num(lx)}' y='{_num(y0 + h / 2)}' text-anchor='middle' font-size='12' "
                f"fill='{self.ycolor}' transform='rotate({90 if self.right else -90} {_num(lx)} {_num(y0 + h / 2)})'>{_esc(self.ylabel)}</text>"
            )
        if self.title:
            lines = self.title.split("\n")
            for i, line in enumerate(lines):
                y = y0 - 7 - (len(lines) - 1 - i) * (self.title_size + 3)
                out.append(
                    f"<text class='title' x='{_num(x0 + w / 2)}' y='{_num(y)}' text-anchor='middle' font-size='{_num(self.title_size)}'>{_esc(line)}</text>"
                )
        return "\n".join(out)

    def _legend(self) -> str:
        fs = self.legend_size
        row = fs + 6
        width = 34 + max(text_width(label, fs) for label, _ in self.legend)
        height = row * len(self.legend) + 6
        # "best": the corner whose box covers the fewest plotted points (lines sampled along their segments)
        pts: list[tuple[float, float]] = []
        for it in self.items:
            if it.kind not in ("line", "points", "errorbar", "bars"):
                continue
            xs, ys = (it.xs[: len(it.xs) // 3], it.ys[1:]) if it.kind == "bars" else (it.xs, it.ys)
            xy = [
                (self.px(x), self.py(y))
                for x, y in zip(xs, ys, strict=True)
                if math.isfinite(x) and math.isfinite(y)
            ]
            pts += xy
            if it.kind == "line":
                for (ax, ay), (bx, by) in itertools.pairwise(xy):
                    corner = (bx, ay) if it.style.get("step") else ((ax + bx) / 2, (ay + by) / 2)
                    for k in range(1, 12):
                        t = k / 12
                        if it.style.get("step"):
                            pts.append((ax + (bx - ax) * t, ay))
                            pts.append((bx, ay + (by - ay) * t))
                        else:
                            pts.append((ax + (bx - ax) * t, ay + (by - ay) * t))
                    pts.append(corner)
            if it.kind == "errorbar":
                top, bottom = self.py(it.ys[2]), self.py(it.ys[1])
                pts += [(self.px(it.xs[0]), top + (bottom - top) * k / 8) for k in range(9)]
        corners = [
            (self.x0 + self.w - width - 6, self.y0 + 6),
            (self.x0 + 6, self.y0 + 6),
            (self.x0 + 6, self.y0 + self.h - height - 6),
            (self.x0 + self.w - width - 6, self.y0 + self.h - height - 6),
        ]
        lx, ly = min(
            corners,
            key=lambda c: sum(
                c[0] - 6 <= px <= c[0] + width + 6 and c[1] - 6 <= py <= c[1] + height + 6 for px, py in pts
            ),
        )
        out = [
            f"<g class='legend'><rect x='{_num(lx)}' y='{_num(ly)}' width='{_num(width)}' height='{_num(height)}' "
            "fill='white' fill-opacity='0.85' stroke='#cccccc' rx='3'/>"
        ]
        for i, (label, s) in enumerate(self.legend):
            cy = ly + 3 + row * i + row / 2
            kind, color = s["kind"], s.get("color", "#555")
            if kind in ("line", "hline", "vline"):
                lw = s.get("lw", 1.0)
                out.append(
                    f"<path d='M{_num(lx + 6)},{_num(cy)}h20' stroke='{color}' stroke-width='{_num(lw)}'{_dash(s.get('ls'), lw)}/>"
                )
            if s.get("marker"):
                out.append(
                    _marker(s["marker"], lx + 16, cy, min(s.get("ms", 6), 10), color, s.get("hollow", False))
                )
            out.append(
                f"<text x='{_num(lx + 30)}' y='{_num(cy + fs * 0.35)}' font-size='{_num(fs)}'>{_esc(label)}</text>"
            )
        out.append("</g>")
        return "".join(out)


def _svg(width: float, height: float, title: str, body: Sequence[str], name: str) -> str:
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{_num(width)}' height='{_num(height)}' "
        f"viewBox='0 0 {_num(width)} {_num(height)}' font-family='{_FONT}' fill='#222' data-figure='{name}'>"
        f"<title>{_esc(title)}</title>"
        f"<rect width='100%' height='100%' fill='white'/>\n" + "\n".join(body) + "\n</svg>\n"
    )


def _suptitle(width: float, text: str, size: float = 14.5) -> str:
    return f"<text class='suptitle' x='{_num(width / 2)}' y='22' text-anchor='middle' font-size='{_num(size)}'>{_esc(text)}</text>"


# ---------------------------------------------------------------------- the four figures
def pruning_curve(summary: Mapping[str, Any]) -> str:
    """The monitored metric against MACs and against parameters (see :func:`~lightning_hprune.report.figures.pruning_curve`)."""
    monitor = summary.get("monitor")
    metric = _metric_points(summary)
    cost = str(summary.get("cost", "macs"))
    target = float(summary.get("target", math.nan))
    width, height = 1100.0, 440.0
    body: list[str] = []
    for j, (key, quantity) in enumerate((("macs", "MACs"), ("params", "parameters"))):
        xs = _cost_points(summary, key)
        if not xs:
            continue
        div, unit = _scale(xs)
        x = [v / div for v in xs]
        if metric and len(metric) == len(x):
            y, ylabel = metric, f"{monitor} (after recovery)"
        else:
            y, ylabel = [100.0 * v / xs[0] for v in xs], f"{quantity} kept (% of dense)"
        panel = Panel(
            x0=80 + j * 550,
            y0=64,
            w=440,
            h=320,
            title=f"{monitor or 'size'} vs {quantity}",
            xlabel=_label(quantity, unit),
            ylabel=ylabel,
            invert_x=True,  # pruning goes from right (dense) to left (small)
        )
        if metric and len(metric) == len(x):
            panel.hline(y[0], "#999999", ls=":", lw=1)
        panel.line(x, y, "#264653", marker="o", ms=6, label="after each event")
        panel.points(x[:1], y[:1], "*", "#f4a261", ms=16, label="dense baseline")
        for i in range(1, len(x)):
            panel.annotate(x[i], y[i], str(i))
        if key == cost and math.isfinite(target):
            panel.vline(x[0] * (1 - target), "#e76f51", ls="--", lw=1.2, label=f"target (-{target:.0%})")
        body.append(panel.render(f"pc{j}"))
    achieved = float(summary.get("achieved", math.nan))
    title = (
        f"Pruning curve: removed {achieved:.1%} of {cost} (target {target:.1%}); "
        "numbers are event indices, the star is the dense model"
    )
    return _svg(width, height, title, [_suptitle(width, title), *body], "pruning_curve")


def over_epochs(summary: Mapping[str, Any]) -> str:
    """Parameters, MACs, the metric and latency over the epochs (see :func:`~lightning_hprune.report.figures.over_epochs`)."""
    events = list(summary.get("events_log", []))
    before = summary.get("before", {})
    last = _last_epoch(summary)
    monitor = summary.get("monitor")
    rollbacks = _rollback_epochs(summary)
    width, height = 1210.0, 715.0
    pw, ph = 470.0, 250.0
    panels = [
        Panel(x0=90 + c * 600, y0=70 + r * 330, w=pw, h=ph, show_xticks=r == 1)
        for r in range(2)
        for c in range(2)
    ]
    all_x = [0.0, float(last), *[float(e["epoch"]) for e in events], *map(float, rollbacks)]
    lo, hi = min(all_x), max(all_x)
    pad = 0.05 * (hi - lo) if hi > lo else 0.5
    for p in panels:
        p.xlim = (lo - pad, hi + pad + 0.12)

    def mark(p: Panel) -> None:
        for i, e in enumerate(events):
            p.vline(
                int(e["epoch"]), "#e76f51", ls="--", lw=0.8, opacity=0.7, label="event" if i == 0 else None
            )
        for i, ep in enumerate(rollbacks):
            p.vline(ep, "#e63946", ls=":", lw=1.5, label="rollback" if i == 0 else None)

    for p, (key, quantity) in zip(panels[:2], (("params", "parameters"), ("macs", "MACs")), strict=True):
        xs = _cost_points(summary, key)
        p.title = f"{quantity} (the model trained during each epoch)"
        if xs:
            div, unit = _scale(xs)
            p.line(*_cost_steps(xs, events, last, div), "#264653", lw=2, step=True)
            p.ylabel = _label(quantity, unit)
            p.ybottom = 0.0
        mark(p)
        p.legend = []  # matplotlib's top panels carry no legend
    p = panels[2]
    timeline = summary.get("timeline", [])
    p.title = str(monitor or "metric")
    p.xlabel = "epoch (events at the end of the marked epochs, after validation)"
    if monitor and timeline:
        p.line(
            [m["epoch"] for m in timeline],
            [m["value"] for m in timeline],
            "#2a9d8f",
            marker="o",
            ms=4,
            label=str(monitor),
        )
        p.legend = []
        base = before.get(monitor)
        if isinstance(base, (int, float)):
            p.hline(float(base), "#999999", ls=":", lw=1, label="before the first event")
        p.ylabel = f"{monitor} (each validation)"
    else:
        p.note = "no monitored metric (monitor=None)"
    mark(p)
    _latency_panel(panels[3], summary, events, last)
    panels[3].xlabel = "epoch"
    legend = list(panels[3].legend)  # matplotlib's latency legend has the measurements only
    mark(panels[3])
    panels[3].legend = legend
    body = [_suptitle(width, "Over the run")] + [p.render(f"oe{i}") for i, p in enumerate(panels)]
    return _svg(width, height, "Over the run", body, "over_epochs")


def _latency_panel(
    p: Panel, summary: Mapping[str, Any], events: Sequence[Mapping[str, Any]], last: int
) -> None:
    points = _latency_points(summary, events, last)
    style: dict[str, tuple[str, str, str, dict[str, Any]]] = {
        "dense": ("s", "#f4a261", "dense, before the first event", {}),
        "event": ("o", "#264653", "after an event", {}),
        "pruned": ("o", "#2a9d8f", "pruned, end of fit", {"ms": 8}),
        "interleaved": ("D", "#f4a261", "dense copy, interleaved", {"ms": 8, "hollow": True}),
    }
    labelled: set[str] = set()
    for kind, x, stats in points:
        marker, color, label, kw = style[kind]
        med = float(stats["median_ms"])
        p.errorbar(
            x,
            med,
            float(stats.get("q1_ms", med)),
            float(stats.get("q3_ms", med)),
            marker,
            color,
            label=None if kind in labelled else label,
            **kw,
        )
        labelled.add(kind)
    p.title = _latency_title(summary)
    if points:
        p.ylabel = "forward latency (ms, median and IQR)"
        p.ybottom = 0.0
    else:
        p.note = "latency not measured (measure_latency=False)"


def hierarchy(summary: Mapping[str, Any], max_layers: int = 80) -> str | None:
    """Every layer's kept width after every event, a heat map (see :func:`~lightning_hprune.report.figures.hierarchy`)."""
    layout = _hierarchy_layout(summary, max_layers)
    if layout is None:
        return None
    layers, columns, values, labels, shown, names, title = layout
    fs = 9.0 if len(shown) > 30 else 10.0
    left = 20 + max(text_width(n, fs) for n in names)
    cell_w = 120.0 if len(columns) <= 6 else 90.0
    cell_h = 34.0 if len(shown) <= 12 else 24.0 if len(shown) <= 30 else 17.0
    top = 40.0 + 15 * title.count("\n")
    grid_w, grid_h = cell_w * len(columns), cell_h * len(shown)
    xlabel = "after each event (cells: kept width in channels, or heads; x: removed with its block)"
    width = max(660.0, left + grid_w + 130, left + text_width(xlabel, 10) + 20)
    height = max(320.0, top + grid_h + 70)
    x0 = left + 10
    body = []
    for line_i, line in enumerate(title.split("\n")):
        body.append(
            f"<text class='title' x='{_num(x0 + grid_w / 2)}' y='{_num(22 + 15 * line_i)}' text-anchor='middle' font-size='12'>{_esc(line)}</text>"
        )
    draw_text = len(shown) * len(columns) <= 600
    for r, i in enumerate(shown):
        y = top + r * cell_h
        body.append(
            f"<text class='layer' x='{_num(x0 - 6)}' y='{_num(y + cell_h / 2 + fs * 0.35)}' text-anchor='end' "
            f"font-size='{_num(fs)}'>{_esc(names[r])}</text>"
        )
        for c, text in enumerate(labels[i]):
            v = values[i][c]
            fill = viridis(v) if math.isfinite(v) else "#d9d9d9"
            x = x0 + c * cell_w
            body.append(
                f"<rect class='cell' data-layer='{_esc(layers[i])}' data-column='{c}' data-kept='{_val(v)}' "
                f"data-label='{_esc(text)}' x='{_num(x)}' y='{_num(y)}' width='{_num(cell_w)}' height='{_num(cell_h)}' fill='{fill}'/>"
            )
            if draw_text:
                color = "white" if math.isfinite(v) and v < 0.55 else "black"
                body.append(
                    f"<text x='{_num(x + cell_w / 2)}' y='{_num(y + cell_h / 2 + 3)}' text-anchor='middle' "
                    f"font-size='9' fill='{color}'>{_esc(text)}</text>"
                )
    body.append(
        f"<rect x='{_num(x0)}' y='{_num(top)}' width='{_num(grid_w)}' height='{_num(grid_h)}' fill='none' stroke='#222' stroke-width='0.8'/>"
    )
    for c, col in enumerate(columns):
        for k, line in enumerate(col.split("\n")):
            body.append(
                f"<text class='column' x='{_num(x0 + (c + 0.5) * cell_w)}' y='{_num(top + grid_h + 15 + 12 * k)}' "
                f"text-anchor='middle' font-size='10'>{_esc(line)}</text>"
            )
    body.append(
        f"<text class='xlabel' x='{_num(x0 + grid_w / 2)}' y='{_num(top + grid_h + 55)}' text-anchor='middle' font-size='11'>{_esc(xlabel)}</text>"
    )
    # colour bar: 0-100 % of the dense width
    cx, cw = x0 + grid_w + 16, 14.0
    stops = "".join(f"<stop offset='{k / 10:.1f}' stop-color='{viridis(1 - k / 10)}'/>" for k in range(11))
    body.append(
        f"<defs><linearGradient id='kept' x1='0' y1='0' x2='0' y2='1'>{stops}</linearGradient></defs>"
    )
    body.append(
        f"<rect x='{_num(cx)}' y='{_num(top)}' width='{_num(cw)}' height='{_num(grid_h)}' fill='url(#kept)' stroke='#222' stroke-width='0.6'/>"
    )
    for k in range(0, 101, 20):
        y = top + grid_h * (1 - k / 100)
        body.append(
            f"<path d='M{_num(cx + cw)},{_num(y)}h3' stroke='#222'/><text x='{_num(cx + cw + 6)}' y='{_num(y + 3.5)}' font-size='9'>{k}</text>"
        )
    ly = top + grid_h / 2
    lx = cx + cw + 36
    body.append(
        f"<text x='{_num(lx)}' y='{_num(ly)}' text-anchor='middle' font-size='10' transform='rotate(90 {_num(lx)} {_num(ly)})'>"
        "kept width (% of the dense width)</text>"
    )
    return _svg(width, height, title.replace("\n", "; "), body, "hierarchy")


def decisions(summary: Mapping[str, Any]) -> str | None:
    """The closed loop's decisions over time (see :func:`~lightning_hprune.report.figures.decisions`); ``None`` without one."""
    entries = list(summary.get("decisions", []))
    if not entries or (all(d.get("action") == "pruned" for d in entries) and not summary.get("max_drop")):
        return None
    width, height = 990.0, 660.0
    top = Panel(
        x0=90, y0=50, w=800, h=250, title="Decisions (a rolled-back event is marked at what it had removed)"
    )
    bottom = Panel(x0=90, y0=340, w=800, h=250, xlabel="epoch")
    events = summary.get("events_log", [])
    kept = _kept_events(summary)
    if kept is not None:
        top.line(*kept, "#264653", step=True, label="kept events")
    seen: set[str] = set()
    for epoch, y, action in _decision_marks(entries):
        top.points(
            [epoch],
            [y],
            _MARKERS.get(action, "o"),
            _COLORS.get(action, "#555555"),
            ms=10 if action in ("roll_back", "stop") else 8,
            label=action.replace("_", " ") if action not in seen else None,
        )
        seen.add(action)
    target = summary.get("target")
    if isinstance(target, (int, float)):
        top.hline(100 * target, "#e76f51", ls="--", lw=1, label=f"target {target:.0%}")
    top.ylabel = f"{summary.get('cost', 'cost')} removed (% of dense)"
    checks = _metric_checks(entries)
    twin = None
    if checks:
        colors = [_COLORS.get(str(d["action"]), "#555555") for d in checks]
        bottom.bars([int(d["epoch"]) for d in checks], [100 * float(d["drop"]) for d in checks], colors, 0.5)
        for d, color in zip(checks, colors, strict=True):
            bottom.points(
                [int(d["epoch"])], [100 * float(d["drop"])], _MARKERS.get(str(d["action"]), "o"), color, ms=8
            )
        max_drop = summary.get("max_drop")
        if isinstance(max_drop, (int, float)):
            bottom.hline(100 * max_drop, "#e63946", ls="--", lw=1.2, label=f"max_drop {max_drop:.1%}")
        rates = [float(d["rate"]) for d in entries]
        twin = Panel(
            x0=bottom.x0,
            y0=bottom.y0,
            w=bottom.w,
            h=bottom.h,
            right=True,
            ylabel="rate (step multiplier)",
            ycolor="#3a86ff",
            ylim=(0.0, max(rates) * 1.25 if max(rates) > 0 else 1.0),
        )
        twin.line([int(d["epoch"]) for d in entries], rates, "#3a86ff", lw=1, step=True)
    else:
        bottom.note = "no check of the metric yet"
    bottom.ylabel = f"drop of {summary.get('monitor')} (% of before)"
    xs = [float(int(d["epoch"])) for d in entries] + [float(int(e["epoch"])) for e in events] + [0.0]
    xs.append(float(_last_epoch(summary)))
    lo, hi = min(xs), max(xs)
    pad = 0.05 * (hi - lo) if hi > lo else 0.5
    for p in (top, bottom) + ((twin,) if twin else ()):
        p.xlim = (lo - pad - 0.25, hi + pad + 0.25)
    top.show_xticks = False
    body = [top.render("dc0"), bottom.render("dc1")]
    if twin is not None:
        body.append(twin.render("dc2"))
    return _svg(width, height, "Decisions of the closed loop", body, "decisions")


def draw_all(summary: Mapping[str, Any]) -> dict[str, str]:
    """Every figure the run has something for, by name, as SVG text (the names of :data:`~lightning_hprune.report.figures.FIGURES`)."""
    return each_figure(
        summary,
        {
            "pruning_curve": pruning_curve,
            "over_epochs": over_epochs,
            "hierarchy": hierarchy,
            "decisions": decisions,
        },
    )
