"""Downloads by id, against a local HTTP server on 127.0.0.1 only (no other address is contacted)."""

from __future__ import annotations

import gzip
import shutil
import socket
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import gemmi
import pytest

from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.fetch import entry_url, fetch_entry, parse_entry_id
from cryoorient_ray.io.maps import load_density
from cryoorient_ray.io.mrc import read_map

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


@pytest.fixture(autouse=True)
def _local_only(monkeypatch):
    """No proxy, no URL templates from the outside environment."""
    for var in PROXY_VARS + ("CRYOORIENT_PDB_URL", "CRYOORIENT_EMDB_URL", "CRYOORIENT_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


class _Handler(SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.requests.append(self.path)
        if self.path.startswith("/error/"):
            self.send_error(500, "Internal Server Error")
            return
        super().do_GET()

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def server(tmp_path, shared_data):
    """Serves a folder with 1CRN (PDB format), an EMDB map, and broken files; yields (base, requests)."""
    root = tmp_path / "www"
    root.mkdir()
    shutil.copyfile(shared_data / "models" / "1crn.pdb.gz", root / "1CRN.pdb.gz")
    shutil.copyfile(shared_data / "maps" / "emd_3197.map.gz", root / "emd_3197.map.gz")
    (root / "2BAD.pdb.gz").write_bytes(b"<html>not gzip at all</html>")
    (root / "3TRU.pdb.gz").write_bytes((shared_data / "models" / "1crn.pdb.gz").read_bytes()[:3000])
    (root / "4EMP.pdb.gz").write_bytes(b"")
    (root / "5NIL.pdb.gz").write_bytes(gzip.compress(b""))
    (root / "1ABC.cif.gz").write_bytes(gzip.compress(b"data_1ABC\n"))
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()
    httpd.server_close()


def test_fetch_pdb_and_reuse_the_cache(server, tmp_path):
    base, requests = server
    cache = tmp_path / "cache"
    path = fetch_entry("1crn", cache, base_url=base + "/{ID}.pdb.gz", timeout=5)
    assert path == cache / "1crn.pdb.gz"
    st = gemmi.read_structure(str(path))
    assert st[0].count_atom_sites() == 327
    again = fetch_entry("1CRN", cache, base_url=base + "/{ID}.pdb.gz", timeout=5)
    assert again == path and requests == ["/1CRN.pdb.gz"]  # the second call did not download
    assert sorted(p.name for p in cache.iterdir()) == ["1crn.pdb.gz"]  # no temporary file left


def test_environment_templates_and_load_density(server, tmp_path, monkeypatch):
    base, requests = server
    monkeypatch.setenv("CRYOORIENT_PDB_URL", base + "/{ID}.pdb.gz")
    monkeypatch.setenv("CRYOORIENT_EMDB_URL", base + "/emd_{n}.map.gz")
    d = load_density("1crn", voxel_size=4.0, cache_dir=tmp_path / "c")
    assert d.name == "1crn" and d.voxel_size == 4.0
    m = load_density("EMD-3197", cache_dir=tmp_path / "c")
    assert m.shape == (20, 20, 20) and m.name == "emd_3197"
    assert fetch_entry("emd_3197", tmp_path / "c", timeout=5) == tmp_path / "c" / "emd_3197.map.gz"
    assert requests == ["/1CRN.pdb.gz", "/emd_3197.map.gz"]
    assert read_map(tmp_path / "c" / "emd_3197.map.gz").voxel_size == pytest.approx(11.4, abs=1e-3)


def test_folder_url_gets_the_default_file_name(server, tmp_path):
    base, requests = server
    path = fetch_entry("1abc", tmp_path, base_url=base + "/", timeout=5)
    assert path == tmp_path / "1abc.cif.gz" and requests == ["/1ABC.cif.gz"]


def test_not_found(server, tmp_path):
    base, _ = server
    url = base + "/9ZZZ.pdb.gz"
    with pytest.raises(CryoOrientError, match=f"entry 9zzz not found at {url}"):
        fetch_entry("9zzz", tmp_path / "c", base_url=base + "/{ID}.pdb.gz", timeout=5)
    assert not any((tmp_path / "c").iterdir())


def test_server_error(server, tmp_path):
    base, _ = server
    with pytest.raises(CryoOrientError, match="HTTP 500"):
        fetch_entry("1crn", tmp_path, base_url=base + "/error/{ID}.pdb.gz", timeout=5)


@pytest.mark.parametrize(
    "entry,match",
    [("2bad", "not a gzip file"), ("3tru", "corrupt gzip"), ("4emp", "is empty"), ("5nil", "empty gzip")],
)
def test_corrupt_downloads_leave_nothing(server, tmp_path, entry, match):
    base, _ = server
    cache = tmp_path / "cache"
    with pytest.raises(CryoOrientError, match=match) as info:
        fetch_entry(entry, cache, base_url=base + "/{ID}.pdb.gz", timeout=5)
    assert base in str(info.value) and "\n" not in str(info.value)
    assert list(cache.iterdir()) == []


def test_closed_port(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(CryoOrientError, match=f"cannot reach 127.0.0.1:{port}"):
        fetch_entry("1crn", tmp_path, base_url=f"http://127.0.0.1:{port}/{{ID}}.cif.gz", timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_silent_server_times_out(tmp_path):
    with socket.socket() as sock:  # accepts connections (kernel backlog) but never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        with pytest.raises(CryoOrientError, match=f"cannot reach 127.0.0.1:{port}: timed out after 0.5 s"):
            fetch_entry("1crn", tmp_path, base_url=f"http://127.0.0.1:{port}/{{ID}}.cif.gz", timeout=0.5)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["12345", "abc", "0abc", "1cr", "EMD-12", "emd_", "EMD-1234567", "", "5j0n.cif"])
def test_invalid_ids(tmp_path, bad):
    with pytest.raises(CryoOrientError, match="invalid entry id"):
        fetch_entry(bad, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_ids_and_default_urls():
    assert parse_entry_id("5J0N").key == "5j0n"
    for text in ("EMD-1234", "emd_1234", "EMD1234", "emd-1234"):
        assert parse_entry_id(text).key == "emd_1234"
    assert entry_url(parse_entry_id("5j0n")) == "https://files.rcsb.org/download/5J0N.cif.gz"
    assert (
        entry_url(parse_entry_id("EMD-12345"))
        == "https://ftp.ebi.ac.uk/pub/databases/emdb/structures/EMD-12345/map/emd_12345.map.gz"
    )
    with pytest.raises(CryoOrientError, match="template"):
        entry_url(parse_entry_id("5j0n"), "http://127.0.0.1/{nope}.cif")


def test_cli_maps_fetch(server, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cryoorient_ray.cli import app

    base, _ = server
    monkeypatch.setenv("CRYOORIENT_PDB_URL", base + "/{ID}.pdb.gz")
    runner = CliRunner()
    ok = runner.invoke(app, ["maps", "fetch", "1crn", "--cache", str(tmp_path / "c")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "c" / "1crn.pdb.gz").is_file()
    missing = runner.invoke(app, ["maps", "fetch", "9zzz", "--cache", str(tmp_path / "c")])
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert missing.exit_code == 1 and len(lines) == 1 and "9zzz" in lines[0].lower(), missing.stderr
