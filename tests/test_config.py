"""Config loading: defaults, overrides, unknown keys, stamping."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cryoorient_ray import __version__
from cryoorient_ray.config import RunConfig, apply_overrides, load_config, write_stamped_config
from cryoorient_ray.errors import CryoOrientError

# run configs; tune_space.yaml is the search space of `cryoorient tune` (tested in test_tune.py)
CONFIGS = sorted(
    p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml") if p.name != "tune_space.yaml"
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def test_configs_exist():
    assert any(p.name == "demo.yaml" for p in CONFIGS)


def _write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_unknown_key_names_the_dotted_path_and_a_suggestion(tmp_path):
    p = _write(tmp_path, "simulate:\n  n_per_mapp: 10\n")
    with pytest.raises(CryoOrientError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert "unknown key 'simulate.n_per_mapp'" in msg and "did you mean 'n_per_map'" in msg
    assert "\n" not in msg


def test_top_level_unknown_key_and_bad_values(tmp_path):
    with pytest.raises(CryoOrientError, match="unknown key 'epochs'"):
        load_config(_write(tmp_path, "epochs: 3\n"))
    with pytest.raises(CryoOrientError, match="simulate.n_per_map"):
        load_config(_write(tmp_path, "simulate: {n_per_map: 0}\n"))
    with pytest.raises(CryoOrientError, match="unknown point group"):
        load_config(_write(tmp_path, "simulate: {orientations: {symmetry: Q7}}\n"))
    with pytest.raises(CryoOrientError, match="sampler"):
        load_config(_write(tmp_path, "simulate: {orientations: {sampler: gaussian}}\n"))


def test_unreadable_files(tmp_path):
    with pytest.raises(CryoOrientError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(CryoOrientError, match="not valid YAML at line 2"):
        load_config(_write(tmp_path, "a: 1\n b: [\n"))
    with pytest.raises(CryoOrientError, match="must be a mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(CryoOrientError, match="not a file"):
        load_config(tmp_path)


def test_overrides_beat_yaml_and_none_is_ignored(tmp_path):
    p = _write(tmp_path, "seed: 3\nsimulate: {n_per_map: 10}\n")
    cfg = load_config(p, {"seed": None, "simulate.n_per_map": 20}, ["simulate.orientations.coverage=half", "name=x"])
    assert cfg.seed == 3 and cfg.simulate.n_per_map == 20
    assert cfg.simulate.orientations.coverage == "half" and cfg.name == "x"
    # --set is applied after typed options
    assert load_config(p, {"seed": 5}, ["seed=6"]).seed == 6


def test_bad_overrides():
    with pytest.raises(CryoOrientError, match="section.key=value"):
        load_config(None, None, ["seed"])
    with pytest.raises(CryoOrientError, match="unknown key 'simulate.nope'"):
        load_config(None, None, ["simulate.nope=1"])
    with pytest.raises(CryoOrientError, match="is a value, not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_stamped_config_records_provenance_and_reloads(tmp_path):
    cfg = load_config(None, {"simulate.n_per_map": 7})
    path = write_stamped_config(cfg, tmp_path / "out", argv=["/usr/bin/cryoorient", "run", "my config.yaml"])
    data = yaml.safe_load(path.read_text())
    assert data["stamp"]["version"] == __version__
    assert data["stamp"]["command"] == "cryoorient run 'my config.yaml'"
    again = load_config(path)
    assert again.simulate.n_per_map == 7 and again.stamp is not None


def test_recover_estimator_from_the_distance_options():
    from cryoorient_ray.config import recover_estimator

    assert recover_estimator(None) is None  # the config's
    assert recover_estimator(Path("m.pt")) == "model"
    assert recover_estimator(None, euclidean=True) == "euclidean"
    assert recover_estimator(None, exact=True) == "exact"
    assert recover_estimator(None, perturb=0.0) == "exact"  # σ² 0 still asks for the exact distances
    assert recover_estimator(None, exact=True, perturb=0.1) == "exact"
    with pytest.raises(CryoOrientError, match="choose one distance estimator; got --model and --euclidean"):
        recover_estimator(Path("m.pt"), euclidean=True)
    with pytest.raises(CryoOrientError, match="got --euclidean and --exact and --perturb"):
        recover_estimator(None, euclidean=True, exact=True, perturb=0.1)
    with pytest.raises(CryoOrientError, match="got --model and --perturb"):
        recover_estimator("m.pt", perturb=0.1)


def test_tune_resume_takes_no_config_options():
    from cryoorient_ray.config import check_tune_resume

    check_tune_resume({"--config": None, "--store": [], "--set": None})
    with pytest.raises(CryoOrientError, match="own config and space; drop --config, --set"):
        check_tune_resume({"--config": Path("c.yaml"), "--space": None, "--set": ["seed=1"]})
