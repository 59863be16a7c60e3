"""Drill reports (demo/drill.py): the short text a person reads in ten
seconds, and a self-contained HTML page with one inline-SVG chart per signal,
the fault shaded and the alert transitions marked, to attach to a review.

Both are made from the drill's JSON record (see demo/drill.py, `run_drill`):
times are Unix seconds, and every value was read from Prometheus with the
incident dashboard's own queries.
"""

from __future__ import annotations

import html
import math
import textwrap

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#d62728"]
MARKS = {"pending": ("#e69f00", "4 3"), "firing": ("#d62728", ""), "cleared": ("#2ca02c", "2 3")}


def fmt(value: float | None, unit: str) -> str:
    """A value in the dashboard panel's unit, as a person reads it."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if unit == "ms":
        return f"{value:.0f} ms"
    if unit == "s":
        return f"{value:.2f} s" if value < 10 else f"{value:.0f} s"
    if unit == "percentunit":
        return f"{100 * value:.0f}%"
    if unit == "reqps":
        return f"{value:.2f}/s"
    if abs(value) >= 100 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.2f}"


def rel(t: float | None, origin: float) -> str:
    return "–" if t is None else f"{t - origin:+.0f}s"


def _alert_line(a: dict, origin: float, fault_end: float) -> str:
    parts = [f"pending {rel(a['pending'], origin)}" if a["pending"] else "never pending"]
    parts.append(f"firing {rel(a['firing'], origin)}" if a["firing"] else "never firing")
    if a["cleared"]:
        after = a["cleared"] - fault_end
        parts.append(f"cleared {rel(a['cleared'], origin)}" + (f" ({after:.0f}s after the fault ended)" if after >= 0 else ""))
    elif a["pending"] or a["firing"]:
        parts.append("still active at the end")
    where = f" [{a['where']}]" if a.get("where") else ""
    return f"{a['alert']}{where}: " + ", ".join(parts)


def text(r: dict) -> str:
    """The short report printed at the end of a drill."""
    t = r["times"]
    origin = t["fault_start"]
    lines = [f"== {r['drill']}: {r['title']} ==",
             *textwrap.wrap(r["what"], 110),
             f"time scale 1/{r['time_scale']:g}: {r['scale_note']}",
             f"fault for {t['fault_end'] - t['fault_start']:.0f}s, drill {t['end'] - t['start']:.0f}s; times below are from the fault's start",
             "",
             f"{'signal (incident dashboard)':<44}{'before':>11}{'during':>11}{'after':>11}"]
    for sig in r["signals"]:
        if not sig["series"]:
            lines.append(f"{sig['name'] + ': no data':<44}")
            continue
        for s in sig["series"]:
            name = f"{sig['name']}: {s['legend']}"
            if len(name) > 43:
                name = name[:42] + "…"
            lines.append(f"{name:<44}" + "".join(f"{fmt(s[k], sig['unit']):>11}" for k in ("before", "during", "after")))
    lines.append("(before: at the fault's start; during: the value furthest from it while the fault lasted; after: at the end)")
    lines += ["", "alerts (Prometheus, this drill's):"]
    for a in r["alerts"]:
        if a["expected"]:
            lines.append("  " + _alert_line(a, origin, t["fault_end"]))
    others = [a for a in r["alerts"] if not a["expected"]]
    if others:
        lines.append("also active during the drill:")
        lines += ["  " + _alert_line(a, origin, t["fault_end"]) for a in others]
    rec = r["recovery"]
    if rec.get("alerts_cleared_s") is not None:
        lines.append(f"time to recover: {rec['alerts_cleared_s']:.0f}s from the end of the fault until its alerts cleared")
    for note in rec.get("notes", []):
        lines.append(f"  {note}")
    if r.get("client"):
        lines += ["", "what the client received:"] + [f"  {c}" for c in r["client"]]
    if r["problems"]:
        lines += ["", "PROBLEMS:"] + [f"  {p}" for p in r["problems"]]
    return "\n".join(lines)


def summary(reports: list[dict]) -> str:
    lines = [f"{'drill':<22}{'alerts fired and cleared':<58}{'recovered':>10}  ok"]
    for r in reports:
        fired = ", ".join(f"{a['alert']} {'✓' if a['firing'] and a['cleared'] else '✗'}" for a in r["alerts"] if a["expected"])
        rec = r["recovery"].get("alerts_cleared_s")
        lines.append(f"{r['drill']:<22}{fired:<58}{('–' if rec is None else f'{rec:.0f}s'):>10}  {'yes' if not r['problems'] else 'NO'}")
    return "\n".join(lines)


# --- HTML with inline SVG --------------------------------------------------------------


def _nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def chart(sig: dict, r: dict, width: int = 560, height: int = 200) -> str:
    """One signal as an SVG line chart: x in seconds from the fault's start."""
    t = r["times"]
    origin = t["fault_start"]
    left, right, top, bottom = 64, 12, 22, 28
    pw, ph = width - left - right, height - top - bottom
    x0, x1 = t["start"] - origin, t["end"] - origin
    values = [v for s in sig["series"] for _, v in s["points"] if v is not None]
    y_max = max(values) if values else 1.0
    y_max = y_max * 1.1 if y_max > 0 else 1.0

    def x(sec: float) -> float:
        return left + pw * (sec - x0) / max(x1 - x0, 1e-9)

    def y(v: float) -> float:
        return top + ph * (1 - v / y_max)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" class="chart">',
           f'<text x="{left}" y="14" class="title">{html.escape(sig["name"])}</text>',
           f'<rect x="{x(t["fault_start"] - origin):.1f}" y="{top}" width="{max(x(t["fault_end"] - origin) - x(0), 1):.1f}" height="{ph}" fill="#fde0dc"/>']
    step = _nice_step(y_max, 4)
    v = 0.0
    while v <= y_max + 1e-12:
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 4}" y="{y(v) + 4:.1f}" class="tick" text-anchor="end">{html.escape(fmt(v, sig["unit"]))}</text>')
        v += step
    xstep = _nice_step(x1 - x0, 6)
    sec = math.ceil(x0 / xstep) * xstep
    while sec <= x1:
        out.append(f'<line x1="{x(sec):.1f}" x2="{x(sec):.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#888"/>')
        out.append(f'<text x="{x(sec):.1f}" y="{top + ph + 16}" class="tick" text-anchor="middle">{sec:+.0f}s</text>')
        sec += xstep
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    for i, s in enumerate(sig["series"]):
        color = PALETTE[i % len(PALETTE)]
        run: list[str] = []
        runs = []
        for when, val in s["points"]:
            if val is None:
                if run:
                    runs.append(run)
                run = []
                continue
            run.append(f"{x(when - origin):.1f},{y(val):.1f}")
        if run:
            runs.append(run)
        for pts in runs:
            if len(pts) == 1:
                cx, cy = pts[0].split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{color}"/>')
            else:
                out.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{color}" stroke-width="1.8"/>')
    for a in r["alerts"]:
        if not a["expected"]:
            continue
        for state, (color, dash) in MARKS.items():
            when = a.get(state)
            if when is None or not (t["start"] <= when <= t["end"]):
                continue
            xs = x(when - origin)
            out.append(f'<line x1="{xs:.1f}" x2="{xs:.1f}" y1="{top}" y2="{top + ph}" stroke="{color}" stroke-width="1.5"'
                       + (f' stroke-dasharray="{dash}"' if dash else "") + f'><title>{html.escape(a["alert"])} {state}</title></line>')
    out.append("</svg>")
    legend = "".join(f'<span class="key"><i style="background:{PALETTE[i % len(PALETTE)]}"></i>{html.escape(s["legend"])}</span>'
                     for i, s in enumerate(sig["series"])) or '<span class="key">no data</span>'
    return f'<figure>{"".join(out)}<figcaption>{legend}</figcaption></figure>'


CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; }
pre { background: #f6f6f6; padding: 10px; font-size: 12px; overflow-x: auto; }
.charts { display: grid; grid-template-columns: repeat(2, 580px); gap: 12px; }
figure { margin: 0; } figcaption { font-size: 12px; }
.key { margin-right: 12px; white-space: nowrap; } .key i { display: inline-block; width: 10px; height: 10px; margin-right: 4px; }
.title { font-size: 13px; font-weight: 600; } .tick { font-size: 10px; fill: #555; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; border-bottom: 1px solid #ddd; text-align: left; }
.marks span { margin-right: 14px; font-size: 12px; }
"""


def html_page(reports: list[dict]) -> str:
    title = "tokentap drill report: " + ", ".join(r["drill"] for r in reports)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if len(reports) > 1:
        parts.append(f"<pre>{html.escape(summary(reports))}</pre>")
    marks = "".join(f'<span><svg width="18" height="10"><line x1="0" x2="18" y1="5" y2="5" stroke="{c}" stroke-width="2"'
                    + (f' stroke-dasharray="{d}"' if d else "") + f'/></svg> alert {s}</span>' for s, (c, d) in MARKS.items())
    for r in reports:
        origin = r["times"]["fault_start"]
        rows = "".join(f"<tr><td>{html.escape(a['alert'])}</td><td>{'this drill' if a['expected'] else 'also'}</td>"
                       f"<td>{html.escape(a.get('where') or '')}</td><td>{rel(a['pending'], origin)}</td><td>{rel(a['firing'], origin)}</td>"
                       f"<td>{rel(a['cleared'], origin)}</td></tr>" for a in r["alerts"])
        parts += [f"<h2 id='{html.escape(r['drill'])}'>{html.escape(r['drill'])}: {html.escape(r['title'])}</h2>",
                  f"<pre>{html.escape(text(r))}</pre>",
                  "<table><tr><th>alert</th><th></th><th>where</th><th>pending</th><th>firing</th><th>cleared</th></tr>" + rows + "</table>",
                  f"<p class='marks'><span style='background:#fde0dc'>&nbsp;fault&nbsp;</span> {marks} (x axis: seconds from the fault's start)</p>",
                  "<div class='charts'>" + "".join(chart(sig, r) for sig in r["signals"]) + "</div>"]
    parts.append("</body></html>")
    return "\n".join(parts)
