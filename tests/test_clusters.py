"""clusters/: launcher YAMLs against Ray's own schema, KubeRay manifests, and the cluster plumbing
(addresses, `cryoorient cluster check`'s plan) without starting Ray."""

from __future__ import annotations

import json
import re
import shlex
import socket
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cryoorient_ray.cli import app
from cryoorient_ray.config import RayConfig, RunConfig, load_config
from cryoorient_ray.errors import CryoOrientError

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
LAUNCHER_FILES = sorted(CLUSTERS.glob("*.yaml"))
KUBERAY_FILES = sorted((CLUSTERS / "kuberay").glob("*.yaml"))
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
runner = CliRunner()


# ----------------------------------------------------------------------------- launcher YAMLs


def test_there_are_aws_and_gcp_launcher_files():
    providers = {yaml.safe_load(p.read_text())["provider"]["type"] for p in LAUNCHER_FILES}
    assert {"aws", "gcp"} <= providers


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_yaml_validates_against_rays_schema(path):
    """The schema the autoscaler ships (ray/autoscaler/ray-schema.json), then Ray's own extra checks."""
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler
    from ray.autoscaler._private.util import validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, schema)
    validate_config(config)  # head_node_type among the node types, min/max workers consistent


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_yaml_has_a_cpu_head_and_autoscaling_gpu_workers(path):
    config = yaml.safe_load(path.read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU")]
    assert gpu_types and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu_types)
    setup = "\n".join(config["setup_commands"])
    assert "cryoorient_ray" in setup and "cpu.txt" not in setup  # the CUDA torch of the image, never the CPU pin
    assert "CHANGE" in path.read_text()


# ----------------------------------------------------------------------------- KubeRay manifests


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in KUBERAY_FILES:
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def _check_pod_template(template: dict, where: str) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers, where
    for c in containers:
        assert DNS_1123.match(c["name"]) and c["image"], where
    mounts = {m["name"] for c in containers for m in c.get("volumeMounts", [])}
    volumes = {v["name"] for v in template["spec"].get("volumes", [])}
    assert mounts <= volumes, f"{where}: volumeMounts without a volume: {mounts - volumes}"
    return containers


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert isinstance(spec["rayVersion"], str)
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), f"{where}: rayStartParams are strings"
    _check_pod_template(head["template"], f"{where} head")
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert DNS_1123.match(g["groupName"])
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
        assert isinstance(g["rayStartParams"], dict)
        containers = _check_pod_template(g["template"], f"{where} group {g['groupName']}")
        limits = containers[0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, f"{where}: GPU workers"


def test_kuberay_manifests_are_kubernetes_objects_of_the_right_kinds():
    docs = _documents()
    kinds = {d["kind"] for _, d in docs}
    assert {"RayCluster", "RayJob"} <= kinds
    for name, d in docs:
        assert set(d) >= {"apiVersion", "kind", "metadata", "spec"}, name
        assert DNS_1123.match(d["metadata"]["name"]), name
        if d["kind"] in ("RayCluster", "RayJob"):
            assert d["apiVersion"] == "ray.io/v1", name
        if d["kind"] == "RayCluster":
            _check_ray_cluster_spec(d["spec"], name)
        elif d["kind"] == "RayJob":
            assert d["spec"]["entrypoint"].strip(), name
            _check_ray_cluster_spec(d["spec"]["rayClusterSpec"], name)
        else:
            assert d["kind"] == "PersistentVolumeClaim" and d["apiVersion"] == "v1", name
            assert "ReadWriteMany" in d["spec"]["accessModes"]


def test_rayjob_entrypoint_is_a_valid_cryoorient_command():
    """The RayJob's `cryoorient run CONFIG --set ...` loads: the config exists and every override is a real key."""
    (job,) = [d for _, d in _documents() if d["kind"] == "RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["cryoorient", "run"]
    config = REPO / Path(argv[2]).relative_to("/home/ray/cryoorient_ray")
    sets = [argv[k + 1] for k, a in enumerate(argv) if a == "--set"]
    cfg = load_config(config, None, sets)
    assert cfg.train.use_gpu and cfg.simulate.store.startswith("s3://")


def test_claims_used_by_pods_are_defined():
    docs = _documents()
    claims = {d["metadata"]["name"] for _, d in docs if d["kind"] == "PersistentVolumeClaim"}
    used = set(re.findall(r"claimName: ([\w-]+)", "\n".join(p.read_text() for p in KUBERAY_FILES)))
    assert used and used <= claims


# ----------------------------------------------------------------------------- addresses, errors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_address_resolution(monkeypatch):
    from cryoorient_ray.distributed.runtime import resolve_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(RayConfig()) is None
    assert resolve_address(RayConfig(address="local")) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert resolve_address(RayConfig()) == "10.0.0.1:6379"
    assert resolve_address(RayConfig(address="head:6379")) == "head:6379"  # the config wins


@pytest.mark.parametrize(
    ("address", "message"),
    [("not-an-address", "must look like host:port"), ("http://x:1", "must look like"), ("127.0.0.1:{port}", "refused")],
)
def test_bad_or_unreachable_address_fails_fast(address, message):
    from cryoorient_ray.distributed.runtime import check_address

    with pytest.raises(CryoOrientError, match=message):
        check_address(address.format(port=_free_port()), timeout=2)


def _one_error_line(result, pattern):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and re.search(pattern, lines[0]), result.output
    assert "Traceback" not in result.output


def test_cli_unreachable_address_is_one_error_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = f"127.0.0.1:{_free_port()}"
    out = tmp_path / "run"
    _one_error_line(
        runner.invoke(app, ["run", str(REPO / "configs/demo.yaml"), "--address", address, "-o", str(out)]),
        "cannot connect to the Ray cluster",
    )
    assert not out.exists()
    _one_error_line(runner.invoke(app, ["cluster", "check", "--address", address]), "cannot connect")
    _one_error_line(runner.invoke(app, ["cluster", "check", "--address", "nonsense"]), "must look like")
    _one_error_line(runner.invoke(app, ["cluster", "check", "--local", "--address", address]), "not both")


def test_cluster_check_without_a_cluster_is_one_error_line(monkeypatch):
    """'auto' finds no `ray start` cluster: a pointer to ray start / --address / --local, exit 1."""
    from cryoorient_ray.distributed import runtime

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runtime.ray, "is_initialized", lambda: False)  # as in a fresh process

    def no_cluster(address=None, **kwargs):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(runtime.ray, "init", no_cluster)
    _one_error_line(runner.invoke(app, ["cluster", "check"]), r"no running Ray cluster found.*ray start --head")


# ----------------------------------------------------------------------------- the plan


def _node(node_id, cpus, gpus=0.0, head=False):
    from cryoorient_ray.distributed.cluster import NodeInfo

    return NodeInfo(node_id, "10.0.0.1", head, cpus, gpus, 16.0, 4.0)


def test_describe_nodes_reads_ray_nodes():
    from cryoorient_ray.distributed.cluster import describe_nodes

    raw = [
        {"NodeID": "w", "Alive": True, "NodeManagerAddress": "10.0.0.2",
         "Resources": {"CPU": 8.0, "GPU": 1.0, "memory": 32 * 2**30, "accelerator_type:A10G": 1.0}},
        {"NodeID": "h", "Alive": True, "NodeManagerAddress": "10.0.0.1",
         "Resources": {"CPU": 16.0, "node:__internal_head__": 1.0, "object_store_memory": 2**31}},
        {"NodeID": "dead", "Alive": False, "Resources": {"CPU": 4.0}},
    ]  # fmt: skip
    nodes = describe_nodes(raw)
    assert [n.node_id for n in nodes] == ["h", "w"]
    assert nodes[0].head and nodes[0].object_store_gib == 2.0
    assert nodes[1].gpus == 1 and nodes[1].accelerator == "A10G" and nodes[1].memory_gib == 32.0


def test_plan_follows_the_config_on_a_gpu_cluster():
    from cryoorient_ray.distributed.cluster import check_report, plan_stages

    cfg = RunConfig.model_validate(
        {
            "simulate": {"n_per_map": 1000, "shard_size": 250, "store": "memory://b/x.zarr"},
            "train": {"num_workers": 4, "use_gpu": True, "cpus_per_worker": 4},
            "recover": {"actors": 2, "cpus_per_actor": 2},
            "refine": {"enabled": True, "actors": 3, "cpus_per_actor": 2, "gpu": True},
        }
    )
    nodes = [_node("h", 16, head=True), _node("g1", 8, 1), _node("g2", 8, 1)]
    plans = {p.stage: p for p in plan_stages(cfg, nodes)}
    assert plans["refine"].per_unit == {"CPU": 2, "GPU": 1.0} and plans["refine"].units == 3
    assert not plans["refine"].fits_now  # three GPU actors on two GPU nodes
    assert plans["simulate"].units == 4 and plans["simulate"].fits_now
    assert plans["train"].per_unit == {"CPU": 4, "GPU": 1.0} and not plans["train"].fits_now
    assert "2 more need GPU nodes" in plans["train"].note
    assert plans["recover"].units == 2 and plans["recover"].fits_now
    assert plans["reconstruct"].runs_on == "driver process"
    more = nodes + [_node("g3", 8, 1), _node("g4", 8, 1)]
    assert {p.stage: p for p in plan_stages(cfg, more)}["train"].fits_now
    report = check_report(cfg, more)
    assert report["totals"] == {"nodes": 5, "CPU": 48.0, "GPU": 4.0, "memory_gib": 80.0}
    assert any("output_dir" in w for w in report["warnings"])
    assert not any("simulate.store" in w for w in report["warnings"])  # an fsspec URL every node can reach
    json.dumps(report)


def test_plan_flags_starved_data_reads_and_in_process_recovery():
    from cryoorient_ray.distributed.cluster import plan_stages, storage_warnings

    cfg = RunConfig.model_validate({"train": {"num_workers": 2, "cpus_per_worker": 2}})
    (node,) = nodes = [_node("h", 4, head=True)]
    plans = {p.stage: p for p in plan_stages(cfg, nodes, driver_has_gpu=True)}
    assert not plans["train"].fits_now and "Ray Data read tasks" in plans["train"].note
    assert plans["recover"].runs_on == "driver process" and "cuda" in plans["recover"].note
    assert "refine" not in plans  # the stage is off by default
    cfg.refine.enabled = True
    refine = {p.stage: p for p in plan_stages(cfg, nodes, driver_has_gpu=False)}["refine"]
    assert refine.runs_on == "driver process" and "cpu" in refine.note
    assert storage_warnings(cfg, nodes) == []  # one node: local paths are fine
    assert node.cpus == 4


def test_without_an_address_a_new_local_ray_starts_even_if_one_runs_here(monkeypatch):
    """ray.init(address=None) would join any Ray on the machine; init_ray asks for 'local'."""
    from cryoorient_ray.distributed import runtime

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runtime.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.ray, "init", lambda address=None, **kw: calls.append((address, kw)))
    assert runtime.init_ray(RayConfig(num_cpus=2)) is True
    assert calls[-1][0] == "local" and calls[-1][1]["num_cpus"] == 2
    runtime.init_ray(RayConfig(address="auto", num_cpus=2))  # a cluster: its own resources
    assert calls[-1][0] == "auto" and "num_cpus" not in calls[-1][1]


def test_cluster_check_report_refuses_address_with_local():
    from cryoorient_ray.distributed.cluster import cluster_check_report

    with pytest.raises(CryoOrientError, match="either --address or --local, not both"):
        cluster_check_report(RunConfig(), address="127.0.0.1:6379", local=True)
