"""OUT/report.html: one page over every slide in an `ikdmil predict` output folder.

One row per slide folder listed in OUT/predict_summary.json (so slides of earlier runs into the same
OUT are there too, as in that index): its overlay thumbnail, tumour area, tissue area, tumour
fraction, polygons, sanity warnings (`ikdmil.inference.sanity`) and links to its outputs; then the
inputs that failed, and the patch images. The page is self-contained (inline CSS, no scripts, nothing
fetched) except for relative links to the files in OUT, so the folder can be moved or zipped whole.
It is rebuilt from the files on disk after each run, under the folder's lock, and written atomically.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from urllib.parse import quote

from ikdmil import __version__
from ikdmil.inference.outputs import PATCH_INDEX, SUMMARY_INDEX, locked
from ikdmil.io import write_text
from ikdmil.visualize import SLIDE_OVERLAY_LEGEND

REPORT_NAME = "report.html"
LINKED = ("overlay.png", "heatmap.png", "probability.tif", "mask.tif", "tumour.geojson", "summary.json")

_CSS = """body{font:13px system-ui,sans-serif;margin:12px;color:#222}
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #ddd;padding:4px 6px;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.n{text-align:right;white-space:nowrap}img{max-height:110px;
max-width:160px;display:block}.warn{color:#a00}.ok{color:#080}.key{display:inline-block;width:18px;height:4px;
vertical-align:middle;margin:0 4px 0 10px}a{color:#036}small{color:#666}"""


def _read(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _num(value, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def _link(folder: str, name: str) -> str:
    return quote(f"{folder}/{name}")


def slide_row(out: Path, entry: dict) -> str:
    """The table row of one slide folder (its summary.json gives what the index does not hold)."""
    folder = str(entry.get("folder") or "")
    s = _read(out / folder / "summary.json")
    e = html.escape
    overlay = _link(folder, "overlay.png")
    thumb = (f'<a href="{overlay}"><img src="{overlay}" alt="overlay of {e(folder)}"></a>'
             if (out / folder / "overlay.png").is_file() else "")
    fraction = s.get("tumour_fraction_of_tissue")
    warnings = s.get("warnings") or []
    warn = ("<br>".join(f'<span class="warn">{e(str(w))}</span>' for w in warnings) if warnings
            else '<span class="ok">none</span>')
    links = " ".join(f'<a href="{_link(folder, n)}">{e(n)}</a>' for n in LINKED if (out / folder / n).is_file())
    status = e(str(entry.get("status") or "done"))
    return (f"<tr><td>{thumb}</td><td><b>{e(str(s.get('slide') or folder))}</b><br><small>{status}</small></td>"
            f"<td class=n>{_num(s.get('tumour_area_mm2'))}</td>"
            f"<td class=n>{_num((s.get('tissue') or {}).get('area_mm2'))}</td>"
            f"<td class=n>{_num(100 * fraction, 1) + ' %' if isinstance(fraction, (int, float)) else '–'}</td>"
            f"<td class=n>{s.get('polygons', '–')}</td><td>{warn}</td><td>{links}</td></tr>")


def render_report(out: Path) -> str:
    """The HTML of OUT's report, from OUT/predict_summary.json and the slide folders' summary.json."""
    index = _read(out / SUMMARY_INDEX)
    slides = [s for s in index.get("slides") or [] if isinstance(s, dict)]
    failures = [f for f in index.get("failures") or [] if isinstance(f, dict)]
    rows = [slide_row(out, s) for s in slides]
    warned = sum(1 for s in slides if _read(out / str(s.get("folder")) / "summary.json").get("warnings"))
    e = html.escape
    legend = "".join(f'<span class="key" style="background:{c}"></span>{e(k)}' for k, c in SLIDE_OVERLAY_LEGEND.items())
    parts = [f"<!DOCTYPE html><html><head><meta charset=utf-8><title>ikdmil predict: {e(out.name)}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h2>ikdmil predict: {len(slides)} slides, {warned} with warnings, {len(failures)} failed, "
             f"{index.get('patches', 0)} patch images</h2>",
             f"<p>Overlays:{legend}. Areas in mm²; tumour % of the tissue. <small>ikdmil {e(__version__)}; "
             f'index: <a href="{SUMMARY_INDEX}">{SUMMARY_INDEX}</a></small></p>']
    if rows:
        parts.append("<table><tr><th>overlay</th><th>slide</th><th>tumour mm²</th><th>tissue mm²</th>"
                     "<th>tumour</th><th>polygons</th><th>warnings</th><th>outputs</th></tr>")
        parts += rows
        parts.append("</table>")
    if failures:
        parts.append("<h3>Failed</h3><table><tr><th>input</th><th>error</th></tr>")
        parts += [f"<tr><td>{e(str(f.get('input')))}</td><td class=warn>{e(str(f.get('error')))}</td></tr>"
                  for f in failures]
        parts.append("</table>")
    if index.get("patches"):
        parts.append(f'<p>Patch images: <a href="masks/">masks/</a>, <a href="overlays/">overlays/</a>, '
                     f'<a href="{PATCH_INDEX}">{PATCH_INDEX}</a></p>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(out: str | Path) -> Path:
    """Rebuild OUT/report.html (under OUT's lock, atomically); returns its path."""
    out = Path(out)
    path = out / REPORT_NAME
    with locked(out):
        write_text(path, render_report(out))
    return path
