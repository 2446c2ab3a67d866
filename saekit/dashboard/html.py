"""The dashboard's static site: index.html and latent_<i>.html, self-contained.

Every text is escaped (`html.escape`); CSS and JS are inline; no page names any URL but its
sibling pages, so the site opens from files and needs no network.
"""

from __future__ import annotations

import math
from collections import Counter
from html import escape
from pathlib import Path
from typing import Any

STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}
th{cursor:pointer;background:#f4f4f4}#latents td{text-align:right}#latents td:nth-child(4){text-align:left}
.ctx{font-family:monospace;white-space:pre;margin:2px 0}
.tok{border-radius:2px}.tok.max{outline:1px solid #c00}.tok.out{color:#999}
.cols{display:flex;gap:2em}.col{flex:1;min-width:0;overflow-x:auto}
.note{color:#a50}
"""

SORT_JS = """
function sortBy(th){const t=th.closest('table'),i=[...th.parentNode.children].indexOf(th),
b=t.tBodies[0],rows=[...b.rows],asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
const key=r=>{const t=r.cells[i].textContent,v=parseFloat(t);return isNaN(v)?t:v};
const keyed=rows.map(r=>[key(r),r]);keyed.sort((x,y)=>(x[0]<y[0]?-1:x[0]>y[0]?1:0)*(asc?1:-1));
b.append(...keyed.map(k=>k[1]))}
function filterRows(q){q=q.toLowerCase();for(const r of document.querySelectorAll('#latents tbody tr'))
r.style.display=r.textContent.toLowerCase().includes(q)?'':'none'}
addEventListener('DOMContentLoaded',()=>{const m=location.hash.match(/^#sort=(\\d+)$/);
if(m)sortBy(document.querySelectorAll('#latents th')[+m[1]])});
"""


def page(title: str, body: str, script: str = "") -> str:
    js = f"<script>{script}</script>" if script else ""
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style>{js}</head><body>{body}</body></html>\n"
    )


def _num(v: float | None, spec: str = ".3g") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _cell(v: float | None, spec: str = ".3g") -> str:
    return f"<td>{_num(v, spec)}</td>"


def top_tokens(view: Any, n: int = 3) -> str:
    """The commonest tokens at the centre of the view's top contexts."""
    common = Counter(c.tokens[c.centre] for c in view.top).most_common(n)
    return " ".join(repr(t) for t, _ in common)


# --------------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------------


def index_html(pages: list, header: dict[str, str], note: str) -> str:
    two = any(len(p.views) > 1 for p in pages)
    heads = ["latent", "density", "max", "top tokens"]
    if two:
        name = pages[0].views[1].name
        heads[1:3] = ["density (encoder)", "max (encoder)"]
        heads += [f"density ({name})", f"max ({name})", "top-context overlap"]
    ths = "".join(f'<th onclick="sortBy(this)">{escape(h)}</th>' for h in heads)
    rows = "".join(_index_row(p, two) for p in pages)
    body = (
        "<h1>saekit dashboard</h1>"
        + _header_list(header)
        + (f'<p class="note">{escape(note)}</p>' if note else "")
        + '<p><input id="q" placeholder="search latents and tokens" oninput="filterRows(this.value)"> '
        + "Click a column to sort (or open index.html#sort=N: the Nth column, from 0)"
        + (" (overlap: low = the encodings disagree)" if two else "")
        + f'.</p><table id="latents"><thead><tr>{ths}</tr></thead><tbody>{rows}</tbody></table>'
    )
    return page("saekit dashboard", body, SORT_JS)


def _index_row(p: Any, two: bool) -> str:
    enc = p.views[0]
    cells = [
        f'<td><a href="latent_{p.latent}.html">{p.latent}</a></td>',
        _cell(enc.density),
        _cell(enc.max),
        f"<td>{escape(top_tokens(enc))}</td>",
    ]
    if two:
        cells += [_cell(p.views[1].density), _cell(p.views[1].max), _cell(p.overlap, ".2f")]
    return f"<tr>{''.join(cells)}</tr>"


def _header_list(header: dict[str, str]) -> str:
    return "<ul>" + "".join(f"<li>{escape(k)}: <code>{escape(v)}</code></li>" for k, v in header.items()) + "</ul>"


# --------------------------------------------------------------------------------------------
# A latent's page
# --------------------------------------------------------------------------------------------


def latent_html(p: Any, note: str, shown: set[int]) -> str:
    cols = "".join(f'<div class="col" data-encoding="{escape(v.name)}">{_view_html(v)}</div>' for v in p.views)
    overlap = "" if p.overlap is None else f"<p>Top-context overlap of the two encodings: {p.overlap:.0%}</p>"
    body = (
        f'<p><a href="index.html">index</a></p><h1>latent {p.latent}</h1>{overlap}'
        f'<div class="cols">{cols}</div>{_logits_html(p.logits, note)}{_nearest_html(p.nearest, shown)}'
    )
    return page(f"latent {p.latent}", body)


def _view_html(v: Any) -> str:
    top = "".join(_context_html(c, v.max) for c in v.top) or "<p>never active on these rows</p>"
    bands = "".join(
        f"<h4>{escape(band)} quantile</h4>" + "".join(_context_html(c, v.max) for c in ctxs) for band, ctxs in v.samples
    )
    return (
        f"<h2>{escape(v.name)}</h2><p>density {_num(v.density)} &middot; max {_num(v.max)}</p>"
        f"{histogram_svg(v.hist)}<h3>top contexts</h3>{top}"
        + (f"<h3>lower-quantile samples</h3>{bands}" if bands else "")
    )


VISIBLE = str.maketrans({"\n": "\u21b5", "\r": "\u240d", "\t": "\u2192"})
"""Line breaks and tabs drawn as symbols, so a context stays one line."""


def _context_html(c: Any, vmax: float) -> str:
    spans = []
    for j, (t, a) in enumerate(zip(c.tokens, c.acts)):
        t = t.translate(VISIBLE)
        cls = "tok" + (" max" if j == c.centre else "") + (" out" if math.isnan(a) else "")
        if math.isnan(a):
            spans.append(f'<span class="{cls}" title="outside the dashboard\'s rows">{escape(t)}</span>')
            continue
        if a <= 0:  # most tokens: no shade, no value to hover (keeps pages small)
            spans.append(f'<span class="{cls}">{escape(t)}</span>')
            continue
        alpha = min(a / vmax, 1.0) if vmax > 0 else 0.0
        style = f"background:rgba(255,100,0,{max(alpha, 0.08):.2f})"
        spans.append(f'<span class="{cls}" data-act="{a:.4g}" title="{a:.4g}" style="{style}">{escape(t)}</span>')
    return f'<div class="ctx" data-row="{c.row}">{c.value:.4g}  {"".join(spans)}</div>'


def histogram_svg(hist: list[tuple[float, int]], w: int = 320, h: int = 80) -> str:
    """Inline SVG bars of (lower bin edge, count) on a log-value axis."""
    if not hist:
        return ""
    top, n = max(c for _, c in hist), len(hist)
    bw = w / n
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{h - h * c / top:.1f}" width="{max(bw - 1, 1):.1f}" height="{h * c / top:.1f}" '
        f'fill="#e60"><title>{e:.3g}: {c}</title></rect>'
        for i, (e, c) in enumerate(hist)
    )
    lo, hi = hist[0][0], hist[-1][0]
    return (
        f'<svg width="{w}" height="{h + 14}" role="img"><g>{bars}</g>'
        f'<text x="0" y="{h + 12}" font-size="10">{lo:.3g}</text>'
        f'<text x="{w}" y="{h + 12}" font-size="10" text-anchor="end">{hi:.3g} (log scale)</text></svg>'
    )


def _logits_html(logits: Any, note: str) -> str:
    if logits is None:
        return f'<h3>logit effects</h3><p class="note">{escape(note or "the model has no unembedding that fits")}</p>'
    sides = "".join(
        f"<div class='col'><h4>{name}</h4>"
        + "".join(f"<div>{escape(repr(t))} {v:+.3g}</div>" for t, v in side)
        + "</div>"
        for name, side in zip(("positive", "negative"), logits)
    )
    return f"<h3>logit effects (W_dec[i] @ W_U)</h3><div class='cols'>{sides}</div>"


def _nearest_html(nearest: list[tuple[int, float]], shown: set[int]) -> str:
    """Links to the nearest latents that have a page; the others by id."""
    link = lambda i: f'<a href="latent_{i}.html">{i}</a>' if i in shown else str(i)  # noqa: E731
    items = "".join(f"<li>{link(i)} ({s:.3f})</li>" for i, s in nearest)
    return f"<h3>nearest latents (decoder cosine)</h3><ul>{items}</ul>"


def write_site(out: Path, pages: list, header: dict[str, str], note: str) -> Path:
    """Each latent's page, then index.html (written last: its presence means the site is whole)."""
    shown = {p.latent for p in pages}
    for p in pages:
        (out / f"latent_{p.latent}.html").write_text(latent_html(p, note, shown))
    index = out / "index.html"
    index.write_text(index_html(pages, header, note))
    return index
