"""Download PDB models and EMDB maps by id into a cache folder (standard library only).

Ids:
  - PDB: 4 characters, a digit 1–9 then 3 letters or digits (``5j0n``, ``1CRN``); stored as
    ``<id>.cif.gz`` (lower case), from ``https://files.rcsb.org/download/{ID}.cif.gz``;
  - EMDB: ``EMD-1234``, ``emd_1234``, ``EMD1234`` (4 or 5 digits); stored as
    ``emd_<n>.map.gz``, from
    ``https://ftp.ebi.ac.uk/pub/databases/emdb/structures/EMD-{n}/map/emd_{n}.map.gz``.

The URL is a template with ``{id}`` (lower-case PDB id, or ``emd_<n>``), ``{ID}`` (upper case,
or ``EMD-<n>``) and ``{n}`` (the EMDB number, or the PDB id). It comes from, in order: the
``base_url`` argument, the environment (``CRYOORIENT_PDB_URL`` / ``CRYOORIENT_EMDB_URL``), the
defaults above. A template without any ``{…}`` is a folder URL: the default file name is
appended. The cached file keeps the template's file name extension (e.g. ``.pdb.gz``), so the
format is still known from the name.

A cached file is reused without any network access. A download goes to a hidden temporary
file in the cache folder and is checked (not empty; for ``.gz``, a complete gzip stream with
content; no HTML error page) before it is renamed into place: a failed or corrupt download
leaves nothing in the cache. Every request has a timeout.
"""

from __future__ import annotations

import gzip
import http.client
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from cryoorient_ray import __version__
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.files import atomic_path

DEFAULT_PDB_URL = "https://files.rcsb.org/download/{ID}.cif.gz"
DEFAULT_EMDB_URL = "https://ftp.ebi.ac.uk/pub/databases/emdb/structures/EMD-{n}/map/emd_{n}.map.gz"
PDB_URL_ENV = "CRYOORIENT_PDB_URL"
EMDB_URL_ENV = "CRYOORIENT_EMDB_URL"
CACHE_ENV = "CRYOORIENT_CACHE"

_PDB_ID = re.compile(r"^[1-9][A-Za-z0-9]{3}$")
_EMDB_ID = re.compile(r"^emd[-_]?(\d{4,5})$", re.IGNORECASE)
_KNOWN_SUFFIXES = (".cif.gz", ".mmcif.gz", ".pdb.gz", ".ent.gz", ".map.gz", ".mrc.gz", ".ccp4.gz")
_KNOWN_SUFFIXES += tuple(s[:-3] for s in _KNOWN_SUFFIXES)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class EntryId:
    """A parsed id: ``kind`` is ``"pdb"`` or ``"emdb"``; ``key`` names the cached file."""

    kind: str
    key: str  # "5j0n" or "emd_1234"
    upper: str  # "5J0N" or "EMD-1234"
    number: str  # EMDB number, or the PDB id


def parse_entry_id(entry_id: str) -> EntryId:
    """Parse a PDB id (``5j0n``) or an EMDB id (``EMD-1234``, ``emd_1234``).

    Raises:
        CryoOrientError: anything else.
    """
    text = str(entry_id).strip()
    if _PDB_ID.match(text):
        return EntryId("pdb", text.lower(), text.upper(), text.lower())
    m = _EMDB_ID.match(text)
    if m:
        n = m.group(1)
        return EntryId("emdb", f"emd_{n}", f"EMD-{n}", n)
    raise CryoOrientError(
        f"invalid entry id {entry_id!r}: expected a PDB id (4 characters, e.g. 5j0n) or an EMDB id (e.g. EMD-1234)"
    )


def is_entry_id(text: str) -> bool:
    """True if ``text`` is a PDB or EMDB id."""
    try:
        parse_entry_id(text)
    except CryoOrientError:
        return False
    return True


def default_cache_dir() -> Path:
    """``$CRYOORIENT_CACHE``, else ``$XDG_CACHE_HOME/cryoorient_ray``, else ``~/.cache/cryoorient_ray``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "cryoorient_ray"


def entry_url(entry: EntryId, base_url: str | None = None) -> str:
    """The download URL of ``entry`` (argument, then environment, then default template)."""
    if entry.kind == "pdb":
        default, env, file_name = DEFAULT_PDB_URL, PDB_URL_ENV, "{ID}.cif.gz"
    else:
        default, env, file_name = DEFAULT_EMDB_URL, EMDB_URL_ENV, "emd_{n}.map.gz"
    template = base_url or os.environ.get(env) or default
    if "{" not in template:
        template = template.rstrip("/") + "/" + file_name
    try:
        return template.format(id=entry.key, ID=entry.upper, n=entry.number)
    except (KeyError, IndexError, ValueError) as exc:
        raise CryoOrientError(
            f"invalid download URL template {template!r} ({exc}); use {{id}}, {{ID}} or {{n}}"
        ) from None


def _cache_name(entry: EntryId, url: str) -> str:
    name = urllib.parse.unquote(Path(urllib.parse.urlsplit(url).path).name).lower()
    for suffix in _KNOWN_SUFFIXES:
        if name.endswith(suffix):
            return entry.key + suffix
    return entry.key + (".cif.gz" if entry.kind == "pdb" else ".map.gz")


def _check_download(path: Path, url: str) -> None:
    """Raise if the downloaded file is empty, not a complete gzip stream, or an HTML page."""
    size = path.stat().st_size
    if size == 0:
        raise CryoOrientError(f"download from {url} is empty")
    with open(path, "rb") as fh:
        head = fh.read(512)
    if path.name.endswith(".gz"):
        if head[:2] != b"\x1f\x8b":
            raise CryoOrientError(f"download from {url} is not a gzip file (corrupt or an error page)")
        total = 0
        try:
            with gzip.open(path, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    total += len(chunk)
        except (OSError, EOFError, zlib.error) as exc:
            raise CryoOrientError(f"download from {url} is a corrupt gzip file ({exc})") from None
        if total == 0:
            raise CryoOrientError(f"download from {url} is an empty gzip file")
    elif head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        raise CryoOrientError(f"download from {url} is an HTML page, not a structure file")


def fetch_entry(
    entry_id: str,
    cache_dir: str | os.PathLike,
    base_url: str | None = None,
    timeout: float = 60,
) -> Path:
    """Download a PDB model or an EMDB map into ``cache_dir`` (or reuse the cached copy).

    Args:
        entry_id: ``5j0n``, ``EMD-1234``, ``emd_1234``...
        cache_dir: folder for downloads (created if needed).
        base_url: URL template overriding the environment and the default (module docstring).
        timeout: seconds for connecting and for each read.

    Returns:
        Path of the cached file, e.g. ``cache_dir/5j0n.cif.gz`` or ``cache_dir/emd_1234.map.gz``.

    Raises:
        CryoOrientError: invalid id; HTTP 404 ("entry … not found at <url>") or another HTTP
            error; a host that cannot be reached or does not answer in time; an empty, non-gzip
            or corrupt download (nothing is left in the cache).
    """
    entry = parse_entry_id(entry_id)
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise CryoOrientError(f"download timeout must be a positive number of seconds; got {timeout!r}")
    url = entry_url(entry, base_url)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CryoOrientError(f"download URL must be http(s)://host/...; got {url!r}")
    folder = Path(cache_dir).expanduser()
    target = folder / _cache_name(entry, url)
    if target.is_file() and target.stat().st_size > 0:
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CryoOrientError(f"cannot create the download cache folder {folder}: {exc}") from None

    host = parts.netloc
    request = urllib.request.Request(url, headers={"User-Agent": f"cryoorient_ray/{__version__}"})
    opener = urllib.request.build_opener()  # reads the proxy settings of the environment now
    with atomic_path(target) as tmp:
        try:
            with opener.open(request, timeout=timeout) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out, _CHUNK)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise CryoOrientError(f"entry {entry_id} not found at {url}") from None
            raise CryoOrientError(f"downloading {url} failed: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                reason = f"timed out after {timeout:g} s"
            raise CryoOrientError(f"cannot reach {host}: {reason}") from None
        except TimeoutError:
            raise CryoOrientError(f"cannot reach {host}: timed out after {timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:  # connection reset, incomplete read...
            raise CryoOrientError(f"downloading {url} failed: {exc}") from None
        _check_download(tmp, url)
    return target
