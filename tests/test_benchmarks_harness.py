"""The benchmark harness: registry, result rendering, and the generated section of BENCHMARKS.md.

The benchmarks themselves are not run here (they take minutes each); ``python -m benchmarks``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402


def _result(name="exact", scale="small", **extra):
    return {
        "name": name,
        "title": "A title",
        "scale": scale,
        "command": f"python -m benchmarks run {name} --scale {scale}",
        "date": "2026-11-24",
        "machine": {"cpus": 2, "cpu": "x", "gpu": None, "torch": "2", "ray": "2", "torch_threads": 2, "python": "3"},
        "wall_s": 12.3,
        "needs_gpu_for_paper": True,
        "reduction": "smaller images",
        "tables": [{"title": "T", "columns": ["a", "b (rad)"], "rows": [{"a": "x", "b (rad)": 0.123456}, {"a": None}]}],
        "notes": ["a note"],
        **extra,
    }


def test_every_suite_module_registers_one_benchmark():
    harness.load_suite()
    assert set(harness.SUITE) <= set(harness.REGISTRY)
    for name in harness.SUITE:
        b = harness.REGISTRY[name]
        assert b.name == name and b.title and callable(b.run)


def test_render_result_has_command_machine_table_and_reduction():
    text = harness.render_result(_result())
    assert "`python -m benchmarks run exact --scale small`" in text
    assert "2 CPUs" in text and "no GPU" in text
    assert "| a | b (rad) |" in text
    assert "| x | 0.123 |" in text
    assert "| – | – |" in text  # missing cells
    assert "smaller images" in text and "- a note" in text


def test_cell_formats():
    assert harness._cell(None) == "–"
    assert harness._cell(True) == "yes"
    assert harness._cell(0.0) == "0"
    assert harness._cell(5e-6) == "5.0e-06"
    assert harness._cell(1234.5) == "1234"
    assert harness._cell(2.345) == "2.35"


def test_write_report_replaces_only_the_generated_section(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    (results / "exact_small.json").write_text(json.dumps(_result()))
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nhand-written intro\n\n## Older section\nkept\n")
    monkeypatch.setattr(harness, "RESULTS", results)
    monkeypatch.setattr(harness, "DOC", doc)
    harness.write_report()
    first = doc.read_text()
    assert first.startswith("# Benchmarks\n")
    assert harness.START in first and harness.END in first
    assert "hand-written intro" in first and "## Older section\nkept" in first
    assert "| `exact` |" in first and "12 s" in first
    # A second report replaces the block instead of adding another one.
    (results / "exact_small.json").write_text(json.dumps(_result(wall_s=99.0)))
    harness.write_report()
    second = doc.read_text()
    assert second.count(harness.START) == 1 and "99 s" in second and "12 s" not in second


def test_cli_lists_and_rejects_unknown_names():
    run = [sys.executable, "-m", "benchmarks"]
    out = subprocess.run(run + ["list"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in harness.SUITE:
        assert name in out.stdout
    bad = subprocess.run(run + ["run", "nope"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown benchmark 'nope'" in bad.stderr


@pytest.mark.parametrize("scale", ["tiny", ""])
def test_cli_rejects_bad_scale(scale):
    bad = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "exact", "--scale", scale],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_run_one_uses_the_benchmarks_thread_count_and_records_it(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    seen = {}

    def fake(ctx):
        seen["threads"] = torch.get_num_threads()
        return {"tables": [], "notes": []}

    monkeypatch.setitem(harness.REGISTRY, "fake", harness.Benchmark("fake", "Fake", fake, small_threads=1))
    before = torch.get_num_threads()
    try:
        record = harness.run_one("fake", "small", 0, ["run", "fake"])
    finally:
        torch.set_num_threads(before)
    assert seen["threads"] == 1
    assert record["machine"]["torch_threads"] == 1
    assert record["command"] == "python -m benchmarks run fake"
    assert json.loads((tmp_path / "fake_small.json").read_text())["load_average"]


def _run_fake(monkeypatch, tmp_path, out: dict) -> dict:
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    monkeypatch.setitem(harness.REGISTRY, "fake", harness.Benchmark("fake", "Fake", lambda ctx: out, small_threads=1))
    import torch

    before = torch.get_num_threads()
    try:
        return harness.run_one("fake", "small", 0, ["run", "fake"])
    finally:
        torch.set_num_threads(before)


def test_run_one_writes_a_flat_headline_and_the_report_shows_it(tmp_path, monkeypatch):
    import numpy as np

    head = {"ray_over_plain_step_ratio": np.float64(0.8125), "demo_total_s": 371.0, "physical": True, "none": None}
    _run_fake(monkeypatch, tmp_path, {"tables": [], "notes": [], "headline": head})
    stored = json.loads((tmp_path / "fake_small.json").read_text())
    assert stored["headline"] == {
        "ray_over_plain_step_ratio": 0.8125,
        "demo_total_s": 371.0,
        "physical": True,
        "none": None,
    }
    text = harness.render_result({**_result(name="fake"), "headline": stored["headline"]})
    assert "Headline: `ray_over_plain_step_ratio` 0.812, `demo_total_s` 371, `physical` yes, `none` –." in text
    assert "Headline" not in harness.render_result(_result())  # results without one render as before


@pytest.mark.parametrize("bad", [{"stages": {"train": 1.0}}, {"times": [1.0, 2.0]}, ["not", "a", "dict"]])
def test_run_one_refuses_a_headline_that_is_not_flat(tmp_path, monkeypatch, bad):
    with pytest.raises(ValueError, match="benchmark 'fake': headline"):
        _run_fake(monkeypatch, tmp_path, {"tables": [], "notes": [], "headline": bad})
    assert not (tmp_path / "fake_small.json").exists()


def test_a_headline_function_derives_the_headline_from_the_tables_now_and_for_stored_results(tmp_path, monkeypatch):
    table = {"title": "t", "columns": ["x"], "rows": [{"x": 2.0}, {"x": 5.0}]}

    def head(result):
        return {"x_max": max(r["x"] for r in result["tables"][0]["rows"])}

    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    bench = harness.Benchmark(
        "fake", "Fake", lambda ctx: {"tables": [table], "notes": []}, small_threads=1, headline=head
    )
    monkeypatch.setitem(harness.REGISTRY, "fake", bench)
    import torch

    before = torch.get_num_threads()
    try:
        harness.run_one("fake", "small", 0, ["run", "fake"])
    finally:
        torch.set_num_threads(before)
    path = tmp_path / "fake_small.json"
    assert json.loads(path.read_text())["headline"] == {"x_max": 5.0}
    # a result stored without one gets it from its own tables; nothing else in it changes
    record = json.loads(path.read_text())
    del record["headline"]
    path.write_text(json.dumps(record))
    assert path in harness.refresh_headlines()
    again = json.loads(path.read_text())
    assert again.pop("headline") == {"x_max": 5.0} and again == record
