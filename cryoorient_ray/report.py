"""The run report: one self-contained HTML page (PNGs embedded) next to summary.json.

Sections follow the pipeline: projections, learned distance, recovery, reconstruction, timings.
Figures that a run did not make (a stage skipped, no ground truth) are simply left out.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from cryoorient_ray import __version__
from cryoorient_ray.io.files import atomic_write_text

# (section, file, caption) in the order they appear.
FIGURES: tuple[tuple[str, str, str], ...] = (
    ("Projections", "projections.png", "Sample simulated projections (protein, RELION angles, shift)."),
    (
        "Learned distance",
        "distances.png",
        "d̂ vs the true d_q on test pairs (paper Fig. 8b), learned vs Euclidean.",
    ),
    ("Learned distance", "training.png", "L_DE per epoch: train, validation, held-out proteins."),
    ("Orientation recovery", "recovered_loss.png", "L_OR per step: the usable proxy of the error without truth."),
    ("Orientation recovery", "recovered_errors.png", "Per-image orientation error: after O(4) (E_OR) and physical."),
    ("Orientation recovery", "recovered_directions.png", "Recovered orientations (viewing directions, in-plane)."),
    ("Reconstruction", "fsc.png", "FSC curves: half maps, and against the true map (paper Fig. 11e)."),
    ("Reconstruction", "volumes.png", "Central slices and projections of the reconstructions and the true map."),
    ("Reconstruction", "refinement.png", "Projection-matching refinement: error and resolution per round."),
)


def png_to_img_tag(path: Path) -> str:
    """An ``<img>`` tag with the PNG file at ``path`` embedded (base64), for self-contained pages."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def _metrics_table(stages: list[dict]) -> str:
    rows = []
    for st in stages:
        metrics = ", ".join(
            f"{k} = {v}" for k, v in (st.get("metrics") or {}).items() if not isinstance(v, dict | list)
        )
        rows.append(
            f"<tr><td>{html.escape(st['name'])}</td><td>{html.escape(st['status'])}</td>"
            f"<td>{st.get('seconds', 0):.1f}</td><td>{html.escape(metrics)}</td></tr>"
        )
    return "<table><tr><th>stage</th><th>status</th><th>seconds</th><th>numbers</th></tr>" + "".join(rows) + "</table>"


def write_report(out: Path, summary: dict) -> Path:
    """``report.html`` in ``out`` from ``summary`` (as in summary.json) and the PNGs found there."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>cryoorient_ray report: {html.escape(summary.get('name', 'run'))}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
        "img{max-width:100%;border:1px solid #ddd;margin:.3em 0}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.25em .5em;font-size:90%;vertical-align:top}"
        ".cap{color:#555;font-size:90%}</style></head><body>",
        f"<h1>{html.escape(summary.get('name', 'run'))}</h1>",
        f"<p>cryoorient_ray {html.escape(str(summary.get('cryoorient_ray', __version__)))}; "
        f"config: <code>config.yaml</code>; numbers: <code>summary.json</code>.</p>",
    ]
    headline = dict(summary.get("headline") or {})
    rec = next((st.get("metrics") or {} for st in summary.get("stages", []) if st.get("name") == "recover"), {})
    if "knn_median_dq" in rec:  # what predicts recovery: how near the graph's kNN truly are
        headline["pair graph neighbour quality"] = (
            f"median true d_q of each image's kNN by d̂ {rec['knn_median_dq']} rad "
            f"(true kNN {rec.get('knn_ideal_median_dq')} rad)"
        )
    if headline:
        parts.append("<h2>Results</h2><ul>")
        parts += [f"<li>{html.escape(k)}: <b>{html.escape(str(v))}</b></li>" for k, v in headline.items()]
        parts.append("</ul>")
    section = None
    for sec, name, caption in FIGURES:
        path = out / name
        if not path.is_file():
            continue
        if sec != section:
            parts.append(f"<h2>{html.escape(sec)}</h2>")
            section = sec
        parts.append(
            f"<figure>{png_to_img_tag(path)}<figcaption class='cap'>{html.escape(caption)}</figcaption></figure>"
        )
    parts.append("<h2>Stages and timings</h2>")
    parts.append(_metrics_table(summary.get("stages", [])))
    parts.append("<h2>summary.json</h2><pre>" + html.escape(json.dumps(summary, indent=2)) + "</pre>")
    parts.append("</body></html>")
    return atomic_write_text(out / "report.html", "\n".join(parts) + "\n")
