"""The run report: one self-contained HTML page (PNGs embedded) next to summary.json.

Sections follow the pipeline: projections, learned distance, recovery, global refinement (with its
table of iterations), reconstruction, timings.
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
    (
        "Global refinement",
        "fsc_iterations.png",
        "Half-map FSC (gold standard: each half matched against its own map) after every iteration.",
    ),
    (
        "Global refinement",
        "resolution_iterations.png",
        "Per iteration: half-map resolution, the search band, FSC0.5 against the true map (when known); "
        "the orientations' mean change and their error after rotation + hand (when known).",
    ),
    ("Reconstruction", "fsc.png", "FSC curves: half maps, and against the true map (paper Fig. 11e)."),
    ("Reconstruction", "volumes.png", "Central slices and projections of the reconstructions and the true map."),
    ("Reconstruction", "refinement.png", "Projection-matching refinement: error and resolution per round."),
    (
        "Bootstrap",
        "bootstrap/bootstrap.png",
        "Bootstrap rounds (0 = the pipeline's result): half-map resolution, and the recovery's and the "
        "refinement's error after rotation + hand (when the truth is known).",
    ),
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


REFINE_SECTION = "Global refinement"
REFINE_FOLDERS = ("", "refine")  # `cryoorient refine` writes into its folder, `cryoorient run` into refine/


def _figure_path(out: Path, name: str) -> Path | None:
    """Where a figure of the report lies: ``out/name``, or for the refine stage of a run ``out/refine/name``."""
    for folder in REFINE_FOLDERS:
        path = out / folder / name
        if path.is_file():
            return path
    return None


def _fmt(value, scale=None, digits: int = 2) -> str:
    if value is None or isinstance(value, str):
        return "" if value is None else value
    return f"{(scale(value) if scale else value):.{digits}f}"


def symmetry_frame_line(frame: dict) -> str:
    """One line for a refinement's ``symmetry_frame`` (its :meth:`SymmetryFrame.summary`)."""
    return (
        f"ab initio map turned {frame['angle_deg']:.1f}° onto the declared symmetry axes "
        f"(self-agreement under the group {frame['identity_score']:.3f} → {frame['score']:.3f})"
    )


def refine_table(out: Path) -> str:
    """The refinement's iterations and final numbers as HTML, from ``refined.json`` ('' when there is none)."""
    import math

    path = next((out / f / "refined.json" for f in REFINE_FOLDERS if (out / f / "refined.json").is_file()), None)
    if path is None:
        return ""
    rep = json.loads(path.read_text())
    cols = (
        ("iteration", "iteration", None, 0),
        ("band_A", "band (Å)", None, 1),
        ("resolution_0143_A", "half maps FSC0.143 (Å)", None, 1),
        ("resolution_05_A", "half maps FSC0.5 (Å)", None, 1),
        ("resolution_05_true_A", "vs true map FSC0.5 (Å)", None, 1),
        ("change_rad", "mean change (°)", math.degrees, 2),
        ("error_rad", "error vs truth (°)", math.degrees, 2),
        ("seconds", "seconds", None, 1),
    )
    history = rep.get("history", [])
    shown = [c for c in cols if any(h.get(c[0]) is not None for h in history)]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _, _ in shown)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(h.get(k), f, d))}</td>" for k, _, f, d in shown) + "</tr>"
        for h in history
    )
    start = rep.get("start", {})
    init = rep.get("initial_model", {})
    final = rep.get("final", {})
    words = [
        f"{rep.get('projections')} projections of {html.escape(str(rep.get('protein')))}, "
        f"start: {html.escape(str(start.get('kind')))} {html.escape(str(start.get('source') or ''))}",
        *(
            [f"initial model: {html.escape(str(init['start']))} ({html.escape(str(init.get('start_reason', '')))})"]
            if "start" in init
            else []
        ),
        *([symmetry_frame_line(init["symmetry_frame"])] if "symmetry_frame" in init else []),
        f"final half-map resolution FSC0.143 {final.get('halfmap_fsc0143_A')} Å, "
        f"FSC0.5 {final.get('halfmap_fsc05_A')} Å",
    ]
    err = rep.get("errors") or {}
    if err:
        line = f"error vs truth: E_OR {err['e_or_o4']:.4f} rad (O(4)), rotation + hand {err['registration']:.4f} rad"
        if "start_registration" in err:
            line += f" (at the start: rotation + hand {err['start_registration']:.4f} rad"
            line += f", E_OR {err['start_e_or_o4']:.4f} rad)" if "start_e_or_o4" in err else ")"
        words.append(line)
    files = "refined.star/.mrcs, map.mrc, half_map_1.mrc, half_map_2.mrc, refined.json"
    where = path.parent.relative_to(out).as_posix()
    words.append(f"files: {html.escape(files)}" + (f" in <code>{html.escape(where)}/</code>" if where != "." else ""))
    items = "".join(f"<li>{w}</li>" for w in words)
    return f"<ul>{items}</ul><table><tr>{head}</tr>{rows}</table>"


BOOTSTRAP_SECTION = "Bootstrap"


def bootstrap_table(out: Path) -> str:
    """The bootstrap's rounds as an HTML table, from ``bootstrap/bootstrap.json`` ('' when there is none)."""
    path = out / "bootstrap" / "bootstrap.json"
    if not path.is_file():
        return ""
    rep = json.loads(path.read_text())
    start = rep.get("start", {})
    cols = (
        ("lowpass_A", "map low-passed to (Å)"),
        ("n_images", "projections"),
        ("fine_tune.start_val_L_DE", "fine-tune val L_DE start (rad²)"),
        ("fine_tune.best_val_L_DE", "fine-tune val L_DE best (rad²)"),
        ("recover.registration", "recovered error (rad)"),
        ("recover.e_or_o4", "recovered E_OR (rad)"),
        ("refine.registration", "refined error (rad)"),
        ("refine.e_or_o4", "refined E_OR (rad)"),
        ("refine.halfmap_fsc0143_A", "half maps FSC0.143 (Å)"),
        ("refine.halfmap_fsc05_A", "half maps FSC0.5 (Å)"),
        ("halfmap_area", "half-map FSC area (shells)"),
        ("kept", "poses kept"),
        ("final.registration", "kept error (rad)"),
        ("total_s", "seconds"),
    )

    def get(entry: dict, key: str):
        for part in key.split("."):
            entry = entry.get(part, {}) if isinstance(entry, dict) else {}
        return None if entry == {} else entry

    first = {
        "recover": start.get("recover", {}),
        "refine": {**start.get("refine", {}), "halfmap_fsc0143_A": start.get("halfmap_fsc0143_A")},
    }
    entries = [("0 (pipeline)", first), *[(str(r.get("round")), r) for r in rep.get("rounds", [])]]
    shown = [c for c in cols if any(get(e, c[0]) is not None for _, e in entries)]
    head = "<th>round</th>" + "".join(f"<th>{html.escape(label)}</th>" for _, label in shown)
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{html.escape(_fmt(get(e, k), None, 3))}</td>" for k, _ in shown)
        + "</tr>"
        for name, e in entries
    )
    where = "files: <code>bootstrap/round_&lt;r&gt;/</code>; numbers: <code>bootstrap/bootstrap.json</code>"
    return f"<p>{where}</p><table><tr>{head}</tr>{rows}</table>"


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
    ran = {st.get("name") for st in summary.get("stages", [])}
    section = None
    for sec, name, caption in FIGURES:
        path = _figure_path(out, name)
        stale = (sec == REFINE_SECTION and "refine" not in ran) or (sec == BOOTSTRAP_SECTION and "bootstrap" not in ran)
        if path is None or stale:  # left from an earlier run with refine / bootstrap
            continue
        if sec != section:
            if section == REFINE_SECTION:
                parts.append(refine_table(out))
            if section == BOOTSTRAP_SECTION:
                parts.append(bootstrap_table(out))
            parts.append(f"<h2>{html.escape(sec)}</h2>")
            section = sec
        parts.append(
            f"<figure>{png_to_img_tag(path)}<figcaption class='cap'>{html.escape(caption)}</figcaption></figure>"
        )
    if section == REFINE_SECTION:
        parts.append(refine_table(out))
    if section == BOOTSTRAP_SECTION:
        parts.append(bootstrap_table(out))
    parts.append("<h2>Stages and timings</h2>")
    parts.append(_metrics_table(summary.get("stages", [])))
    parts.append("<h2>summary.json</h2><pre>" + html.escape(json.dumps(summary, indent=2)) + "</pre>")
    parts.append("</body></html>")
    return atomic_write_text(out / "report.html", "\n".join(parts) + "\n")
