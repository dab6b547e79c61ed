"""Sharded Zarr v3 projection stores: one store per dataset.

Layout of ``<name>.zarr`` (Zarr format 3):

    zarr.json                  group attributes: ``cryoorient`` = the manifest (below)
    images        (N, L, L)    float32, one chunk per image, ``shard_size`` images per shard file
    noise_variance (N,)        float32, σ² of the added noise per pixel of the acquisition box (0 when noiseless)
    clean         (N, L, L)    float32, only in stores simulated with noise or CTF (manifest ``has_clean``):
                               the projection at the working box before CTF and noise (Fourier-cropped
                               with the images' scaling), what fresh noise is drawn on in training
    clean_variance (N,)        float32, with ``clean``: the variance of each clean projection over the
                               acquisition box (before CTF), what the per-image SNR is relative to
    quaternion    (N, 4)       float64, wxyz, the true orientation (NaN when unknown)
    euler         (N, 3)       float64, RELION rot/tilt/psi in degrees (NaN when unknown)
    shift         (N, 2)       float32, (x, y) in pixels: the object's centre sits at (L//2 + x, L//2 + y)
    defocus_u, defocus_v, defocus_angle (N,)  float32, Å, Å, degrees (RELION)
    protein       (N,)         int32, index into manifest["proteins"]
    split         (N,)         uint8, 0 = train, 1 = val, 2 = test
    shard_done    (n_shards,)  uint8, 1 once a shard's images are completely written
    shard_nbytes  (n_shards,)  int64, bytes of the shard's ``images`` file when it was flagged done
    volumes/p0000 (D, D, D)    float32, the prepared density map of each protein (when known), at the
                               working box and pixel size (D = L)
    volumes/acquisition/p0000  (L_acq, L_acq, L_acq) float32, the map the images were rendered from,
                               only when the acquisition box differs from the working box

Per-sample arrays other than ``images`` and ``noise_variance`` are written once by the driver
before any shard; each shard task then writes its block of ``images`` and ``noise_variance`` and,
last, its ``shard_nbytes`` record and ``shard_done`` flag. Readers only use shards whose flag is
set, so an interrupted run never exposes a half-written shard, and re-running the same config
writes only missing shards.

Integrity: the done record is tied to the data it vouches for. :meth:`ProjectionStore.open`
(``verify=True``, the default) checks that every array's metadata is there and that each done
shard's image file has the recorded size (one ``stat`` per shard, no data read), and stops with
one :class:`CryoOrientError` naming the damaged shards; ``simulate`` re-renders them on a re-run
(:meth:`ProjectionStore.damaged_shards`, :meth:`ProjectionStore.clear_shards`). Ray Data readers
open with ``verify=False`` (the driver verified the store before reading).

The manifest records the format, package version, the generating config and its hash, image
size, pixel size, shard size, proteins (name, source, symmetry, start/count, held out or not),
optics (voltage, Cs, amplitude contrast) and split names. Simulated stores made since the
acquisition box exists also record ``acquisition``: ``image_size`` and ``pixel_size`` (Å) of the
box the images were simulated at (CTF and noise applied there, then Fourier-cropped to
``image_size``), ``snr_db`` (per image at that box, None = noiseless), ``noise_variance_box``
(``"acquisition"``: the per-image ``noise_variance`` is σ² per acquisition pixel) and
``noise_variance_to_working`` (``(L / L_acq)²``: σ² per working pixel of the white noise is
``noise_variance`` times it). :attr:`ProjectionStore.acquisition` gives it, derived for older
stores (acquisition = working box). Paths may be local folders or fsspec URLs (``s3://``,
``gs://``) that zarr understands.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryoorient_ray import __version__
from cryoorient_ray.errors import CryoOrientError

if TYPE_CHECKING:
    from cryoorient_ray.core.imaging.particles import ParticleStack

FORMAT = "cryoorient-projections/1"
SPLITS = ("train", "val", "test")
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
PROTEIN_SETS = ("all", "seen", "heldout")

# name -> (trailing shape, dtype, fill value)
METADATA_ARRAYS: dict[str, tuple[tuple[int, ...], str, Any]] = {
    "quaternion": ((4,), "float64", np.nan),
    "euler": ((3,), "float64", np.nan),
    "shift": ((2,), "float32", 0.0),
    "defocus_u": ((), "float32", 0.0),
    "defocus_v": ((), "float32", 0.0),
    "defocus_angle": ((), "float32", 0.0),
    "protein": ((), "int32", -1),
    "split": ((), "uint8", 0),
}
SHARD_ARRAYS = ("images", "noise_variance")
CLEAN_ARRAYS = ("clean", "clean_variance")  # only in stores whose manifest says ``has_clean``
STATE_ARRAYS = ("shard_done",)  # every store has these; ``shard_nbytes`` only stores made since it exists


def split_codes(splits: str | Sequence[str]) -> list[int]:
    """Codes of split names (``train``, ``val``, ``test``); an unknown name is bad input."""
    names = [splits] if isinstance(splits, str) else list(splits)
    bad = [s for s in names if s not in SPLIT_CODES]
    if bad:
        raise CryoOrientError(f"unknown split(s) {', '.join(map(repr, bad))}; use train, val or test")
    return [SPLIT_CODES[s] for s in names]


def config_hash(config: dict) -> str:
    """Stable short hash of a JSON-able config (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_url(path: str | os.PathLike) -> bool:
    """True for fsspec URLs (``s3://bucket/x.zarr``, ``gs://…``, ``file:///…``, ``memory://…``)."""
    return "://" in str(path)


def absolute_store_path(path: str | os.PathLike) -> str:
    """A store location every Ray worker can resolve: URLs unchanged, local paths made absolute.

    Ray workers do not share the driver's working directory (on a cluster they run on other
    machines), so a relative path like ``runs/demo/projections.zarr`` must not reach them.
    """
    return str(path) if is_url(path) else os.path.abspath(os.fspath(path))


def _storage_options(path: str | os.PathLike) -> dict | None:
    """fsspec options for a URL: ``file://`` stores create their folders as shards arrive."""
    protocol = str(path).split("://", 1)[0] if is_url(path) else None
    return {"auto_mkdir": True} if protocol in ("file", "local") else None


def store_exists(path: str | os.PathLike) -> bool:
    """Whether a store (a Zarr group) is at ``path``: a local folder, or a URL opened through fsspec.

    Raises:
        CryoOrientError: the URL's protocol needs a package that is not installed (s3fs, gcsfs).
    """
    if not is_url(path):
        return Path(path).exists()
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(str(path))
    except (ImportError, ValueError) as exc:
        protocol = str(path).split("://", 1)[0]
        raise CryoOrientError(f"cannot open {path}: no fsspec support for '{protocol}://' here ({exc})") from None
    return bool(fs.exists(root.rstrip("/") + "/zarr.json"))


def _gather(fn, items: Sequence) -> list:
    """``[await fn(x) for x in items]``, run concurrently on zarr's event loop (store calls are async)."""
    import asyncio

    from zarr.core.sync import sync

    async def run() -> list:
        return list(await asyncio.gather(*(fn(x) for x in items)))

    return sync(run())


def _zarr():
    import zarr  # imported lazily: core and the CLI start without it

    return zarr


class ProjectionStore:
    """A projection dataset on disk (or object storage). Open with :meth:`create` or :meth:`open`."""

    def __init__(self, path: str | os.PathLike, group: Any):
        self.path = str(path)
        self.group = group
        self._damaged: list[int] = []  # shards found damaged by the last check (masked out of done_shards)

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        manifest: dict,
        n_samples: int,
        image_size: int,
        shard_size: int,
        clean: bool = False,
    ) -> ProjectionStore:
        """Create an empty store (all shards missing). Fails if something already exists there.

        ``clean``: also hold the clean projections (``clean``, ``clean_variance``; manifest ``has_clean``)."""
        zarr = _zarr()
        if n_samples < 1 or image_size < 1 or shard_size < 1:
            raise CryoOrientError(f"invalid store shape: {n_samples} samples of {image_size}², shards of {shard_size}")
        if store_exists(path):
            raise CryoOrientError(f"{path} already exists")
        shard_size = min(shard_size, n_samples)
        n_shards = -(-n_samples // shard_size)
        full = dict(manifest)
        full.update(
            format=FORMAT,
            version=__version__,
            n_samples=int(n_samples),
            image_size=int(image_size),
            shard_size=int(shard_size),
            n_shards=int(n_shards),
            splits=list(SPLITS),
            metadata_written=False,
            has_clean=bool(clean),
        )
        group = zarr.open_group(str(path), mode="w-", zarr_format=3, storage_options=_storage_options(path))
        # the noisy images and, with clean, the clean projections: each a stack and a per-image variance
        for images, variance in [("images", "noise_variance")] + ([("clean", "clean_variance")] if clean else []):
            group.create_array(
                images,
                shape=(n_samples, image_size, image_size),
                chunks=(1, image_size, image_size),
                shards=(shard_size, image_size, image_size),
                dtype="float32",
                fill_value=0.0,
            )
            group.create_array(variance, shape=(n_samples,), chunks=(shard_size,), dtype="float32", fill_value=0.0)
        for name, (trail, dtype, fill) in METADATA_ARRAYS.items():
            group.create_array(
                name, shape=(n_samples, *trail), chunks=(shard_size, *trail), dtype=dtype, fill_value=fill
            )
        group.create_array("shard_done", shape=(n_shards,), chunks=(1,), dtype="uint8", fill_value=0)
        group.create_array("shard_nbytes", shape=(n_shards,), chunks=(1,), dtype="int64", fill_value=-1)
        group.require_group("volumes")
        group.attrs["cryoorient"] = full
        return cls(path, group)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", verify: bool = True) -> ProjectionStore:
        """Open an existing store (``mode`` "r" or "r+"), checking that it is one of ours.

        ``verify`` also checks its integrity (:meth:`verify`): every array is there and every
        shard flagged done still has its image data. Readers inside Ray tasks pass False.
        """
        zarr = _zarr()
        if not store_exists(path):
            raise CryoOrientError(f"projection store not found: {path}")
        try:
            group = zarr.open_group(str(path), mode=mode, storage_options=_storage_options(path))
        except Exception as exc:  # zarr raises several types for non-stores
            raise CryoOrientError(f"{path} is not a Zarr store: {exc}") from None
        manifest = group.attrs.get("cryoorient")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CryoOrientError(f"{path} is not a cryoorient projection store (no '{FORMAT}' manifest)")
        store = cls(path, group)
        if verify:
            store.verify()
        return store

    # ------------------------------------------------------------------ manifest
    @property
    def manifest(self) -> dict:
        return dict(self.group.attrs["cryoorient"])

    def update_manifest(self, **values: Any) -> None:
        m = self.manifest
        m.update(values)
        self.group.attrs["cryoorient"] = m

    @property
    def n_samples(self) -> int:
        return int(self.manifest["n_samples"])

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def shard_size(self) -> int:
        return int(self.manifest["shard_size"])

    @property
    def n_shards(self) -> int:
        return int(self.manifest["n_shards"])

    @property
    def pixel_size(self) -> float:
        return float(self.manifest["pixel_size"])

    @property
    def acquisition(self) -> dict:
        """The manifest's ``acquisition`` record (module docstring); for stores made before it was
        recorded, the working box and pixel size with the config's SNR (they were simulated there; None =
        noiseless, or unknown for imported particles)."""
        m = self.manifest
        if isinstance(m.get("acquisition"), dict):
            return dict(m["acquisition"])
        noise = (m.get("config") or {}).get("noise") or {}
        return {
            "image_size": int(m["image_size"]),
            "pixel_size": m.get("pixel_size"),
            "snr_db": noise.get("snr_db"),
            "noise_variance_box": "acquisition",
            "noise_variance_to_working": 1.0,
        }

    @property
    def has_clean(self) -> bool:
        """Whether the store holds the clean projections (``clean``, ``clean_variance``): stores
        simulated with noise or CTF since fresh training noise exists."""
        return bool(self.manifest.get("has_clean", False))

    @property
    def proteins(self) -> list[dict]:
        return list(self.manifest.get("proteins", []))

    def protein_mask(self, proteins: str = "all") -> np.ndarray:
        """Boolean mask over proteins: ``all``, ``seen`` (not held out from training) or ``heldout``."""
        if proteins not in PROTEIN_SETS:
            raise CryoOrientError(f"proteins must be one of {', '.join(PROTEIN_SETS)}, got {proteins!r}")
        held = np.array([bool(p.get("heldout")) for p in self.proteins], dtype=bool)
        if proteins == "seen":
            return ~held
        if proteins == "heldout":
            return held
        return np.ones(len(held), dtype=bool)

    def protein_index(self, protein: str | int) -> int:
        """Index of a protein given by name (or by its index, as a number or a string of digits)."""
        names = [p["name"] for p in self.proteins]
        if isinstance(protein, str) and protein in names:
            return names.index(protein)
        text = str(protein)
        if text.isdigit() and int(text) < len(names):
            return int(text)
        raise CryoOrientError(f"protein {protein!r} is not in {self.path} (it has: {', '.join(names)})")

    def select_rows(
        self, split: str | Sequence[str] | None = None, protein: str | int | None = None, proteins: str = "all"
    ) -> np.ndarray:
        """Completed rows (sorted indices) of the wanted split(s) and protein(s): the one row filter.

        Args:
            split: ``train``, ``val``, ``test``, a list of them, or ``None`` for every split.
            protein: one protein by name or index, or ``None`` for the set ``proteins``.
            proteins: ``all``, ``seen`` (not held out from training) or ``heldout``.
        """
        rows = self.done_rows()
        if len(rows) == 0:
            return rows
        return rows[self.row_mask(self.read_metadata(rows, names=["split", "protein"]), split, protein, proteins)]

    def row_mask(
        self,
        meta: dict,
        split: str | Sequence[str] | None = None,
        protein: str | int | None = None,
        proteins: str = "all",
    ) -> np.ndarray:
        """:meth:`select_rows`' filter on metadata already read (its ``split`` and ``protein`` arrays)."""
        prot = np.asarray(meta["protein"])
        keep = self.protein_mask(proteins)[np.clip(prot, 0, None)]
        if split is not None:
            keep &= np.isin(np.asarray(meta["split"]), split_codes(split))
        if protein is not None:
            keep &= prot == self.protein_index(protein)
        return keep

    def symmetries(self) -> dict[int, str]:
        """Point group of each protein index."""
        return {k: p.get("symmetry", "C1") for k, p in enumerate(self.proteins)}

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Sample rows ``[start, stop)`` of a shard."""
        if not 0 <= shard < self.n_shards:
            raise CryoOrientError(f"shard {shard} out of range 0..{self.n_shards - 1}")
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.n_samples)

    # ------------------------------------------------------------------ integrity
    def _keys(self, names: Sequence[str]) -> list[str]:
        root = self.group.store_path.path
        return [f"{root}/{n}" if root else n for n in names]

    def missing_arrays(self) -> list[str]:
        """Names of the arrays whose metadata (``<name>/zarr.json``) is gone."""
        names = [*SHARD_ARRAYS, *METADATA_ARRAYS, *STATE_ARRAYS, *(CLEAN_ARRAYS if self.has_clean else ())]
        found = _gather(self.group.store.exists, self._keys([f"{n}/zarr.json" for n in names]))
        return [n for n, ok in zip(names, found, strict=True) if not ok]

    def _shard_file_nbytes(self, shards: Sequence[int]) -> list[int]:
        """Bytes of each shard's ``images`` file (0 when there is none), asked concurrently."""
        arr, store = self.group["images"], self.group.store

        async def size(key: str) -> int:
            try:
                return int(await store.getsize(key))
            except (FileNotFoundError, KeyError):
                return 0

        keys = self._keys([f"images/{arr.metadata.encode_chunk_key((int(k), 0, 0))}" for k in shards])
        return _gather(size, keys)

    def damaged_shards(self) -> list[int]:
        """Shards flagged done whose image file is gone or no longer has the recorded size.

        Stores made before sizes were recorded only have the file's presence checked.
        """
        flagged = np.flatnonzero(self.group["shard_done"][:].astype(bool))
        recorded = self.group["shard_nbytes"][:] if "shard_nbytes" in self.group else None
        damaged = []
        for k, size in zip(map(int, flagged), self._shard_file_nbytes(flagged), strict=True):
            want = -1 if recorded is None else int(recorded[k])
            intact = size == want if want >= 0 else size > 0
            if not intact:
                damaged.append(k)
        self._damaged = damaged
        return damaged

    def damage_report(self, damaged: Sequence[int]) -> str:
        """One line naming the damaged shards and their rows."""
        parts = [f"{k} (rows {a}-{b - 1})" for k in damaged for a, b in [self.shard_range(k)]]
        return f"shard{'s' if len(parts) > 1 else ''} {', '.join(parts)} lost image data ({self.path}/images)"

    def check_arrays(self) -> None:
        """Raise one :class:`CryoOrientError` naming the arrays whose metadata is gone."""
        missing = self.missing_arrays()
        if missing:
            where = ", ".join(f"{self.path}/{n}/zarr.json" for n in missing)
            raise CryoOrientError(f"{self.path} is damaged: missing array metadata {where}; re-create the store")

    def verify(self) -> None:
        """Raise one :class:`CryoOrientError` when an array is missing or a done shard lost its data."""
        self.check_arrays()
        damaged = self.damaged_shards()
        if damaged:
            raise CryoOrientError(
                f"{self.path} is damaged: {self.damage_report(damaged)}; "
                "re-run the command that made it (simulate re-renders damaged shards)"
            )

    def clear_shards(self, shards: Sequence[int]) -> None:
        """Unset the done flags of ``shards`` (they are rendered again)."""
        for k in shards:
            self.group["shard_done"][int(k)] = 0
        self._damaged = []

    # ------------------------------------------------------------------ state
    def done_shards(self) -> np.ndarray:
        """Boolean mask over shards: True where the shard is completely written (and not found damaged)."""
        done = self.group["shard_done"][:].astype(bool)
        done[self._damaged] = False
        return done

    @property
    def is_complete(self) -> bool:
        return bool(self.manifest.get("metadata_written")) and bool(self.done_shards().all())

    def done_rows(self) -> np.ndarray:
        """Indices of the samples in completed shards."""
        rows = [np.arange(*self.shard_range(k)) for k in np.flatnonzero(self.done_shards())]
        return np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------ writing
    def write_metadata(self, arrays: dict[str, np.ndarray]) -> None:
        """Write every per-sample metadata array at once (driver side), then mark it written."""
        missing = set(METADATA_ARRAYS) - set(arrays)
        if missing:
            raise CryoOrientError(f"metadata is missing {', '.join(sorted(missing))}")
        for name, values in arrays.items():
            if name not in METADATA_ARRAYS:
                raise CryoOrientError(f"unknown metadata array {name!r}")
            trail, dtype, _ = METADATA_ARRAYS[name]
            values = np.asarray(values, dtype=dtype)
            if values.shape != (self.n_samples, *trail):
                raise CryoOrientError(f"{name} has shape {values.shape}, expected {(self.n_samples, *trail)}")
            self.group[name][...] = values
        self.update_manifest(metadata_written=True)

    def write_shard(
        self,
        shard: int,
        images: np.ndarray,
        noise_variance: np.ndarray,
        clean: np.ndarray | None = None,
        clean_variance: np.ndarray | None = None,
    ) -> None:
        """Write one shard's images and noise variances (and, in a store with :attr:`has_clean`, its
        clean projections and their acquisition-box variances), then set its done flag (last)."""
        start, stop = self.shard_range(shard)
        n, size = stop - start, self.image_size
        images = np.asarray(images, dtype=np.float32)
        if images.shape != (n, size, size):
            raise CryoOrientError(f"shard {shard} needs images of shape {(n, size, size)}, got {images.shape}")
        if not np.isfinite(images).all():
            raise CryoOrientError(f"shard {shard}: images contain NaN or inf")
        self.group["images"][start:stop] = images
        self.group["noise_variance"][start:stop] = np.asarray(noise_variance, dtype=np.float32).reshape(n)
        if self.has_clean:
            if clean is None or clean_variance is None:
                raise CryoOrientError(f"shard {shard}: this store holds clean projections; give them too")
            clean = np.asarray(clean, dtype=np.float32)
            if clean.shape != (n, size, size) or not np.isfinite(clean).all():
                raise CryoOrientError(f"shard {shard} needs finite clean images of shape {(n, size, size)}")
            self.group["clean"][start:stop] = clean
            self.group["clean_variance"][start:stop] = np.asarray(clean_variance, dtype=np.float32).reshape(n)
        if "shard_nbytes" in self.group:
            self.group["shard_nbytes"][shard] = self._shard_file_nbytes([shard])[0]
        self.group["shard_done"][shard] = 1

    def _volumes(self, acquisition: bool, create: bool = False):
        vols = self.group["volumes"]
        if not acquisition:
            return vols
        return vols.require_group("acquisition") if create else vols.get("acquisition")

    def write_volume(self, protein: int, data: np.ndarray, acquisition: bool = False) -> None:
        """Store the prepared density map of protein ``protein`` (``acquisition``: the map at the
        acquisition box that the images were rendered from, when that differs from the working box)."""
        vols = self._volumes(acquisition, create=True)
        name = f"p{protein:04d}"
        data = np.asarray(data, dtype=np.float32)
        arr = vols.create_array(name, shape=data.shape, chunks=data.shape, dtype="float32", overwrite=True)
        arr[...] = data

    # ------------------------------------------------------------------ reading
    def has_volume(self, protein: int, acquisition: bool = False) -> bool:
        vols = self._volumes(acquisition)
        return vols is not None and f"p{protein:04d}" in vols

    def read_volume(self, protein: int, acquisition: bool = False) -> np.ndarray:
        """The map of protein ``protein`` at the working box (or, ``acquisition``, at the acquisition box)."""
        name = f"p{protein:04d}"
        if not self.has_volume(protein, acquisition):
            what = "acquisition-box density map" if acquisition else "density map"
            raise CryoOrientError(f"{self.path} has no {what} for protein {protein}")
        return self._volumes(acquisition)[name][...]

    def read_metadata(self, rows: slice | np.ndarray | None = None, names: Iterable[str] | None = None) -> dict:
        """Per-sample metadata (and ``noise_variance``) for ``rows`` (all rows by default)."""
        sel = slice(None) if rows is None else rows
        wanted = list(names) if names is not None else [*METADATA_ARRAYS, "noise_variance"]
        out = {}
        for name in wanted:
            arr = self.group[name]
            out[name] = arr[sel] if isinstance(sel, slice) else arr.get_orthogonal_selection((np.asarray(sel),))
        return out

    def read_shard(self, shard: int, clean: bool = False) -> dict:
        """Everything of one completed shard: ``images``, metadata and ``index`` (global rows).

        ``clean``: ``images`` are the clean projections instead, with their ``clean_variance``
        (:meth:`require_clean`)."""
        if not self.done_shards()[shard]:
            raise CryoOrientError(f"shard {shard} of {self.path} is not complete")
        start, stop = self.shard_range(shard)
        out = self.read_metadata(slice(start, stop))
        if clean:
            out["images"], out["clean_variance"] = self.read_clean(slice(start, stop))
        else:
            out["images"] = self.group["images"][start:stop]
        out["index"] = np.arange(start, stop)
        return out

    @property
    def images_are_clean(self) -> bool:
        """True for simulated stores whose images are themselves clean: no noise, no CTF, simulated
        at the working box (so the images' variance is the acquisition-box variance)."""
        m = self.manifest
        acq = self.acquisition
        return (
            m.get("source") == "simulated"
            and acq.get("snr_db") is None
            and not m.get("ctf_applied", False)
            and int(acq["image_size"]) == self.image_size
        )

    def require_clean(self) -> None:
        """Stop with one clear line when the store cannot give clean projections (fresh noise needs them)."""
        if not (self.has_clean or self.images_are_clean):
            raise CryoOrientError(
                f"{self.path} holds no clean projections (made before they were stored, or imported), so "
                "training cannot draw fresh noise on it: simulate it again, or set train.noise.fresh: false"
            )

    def read_clean(self, rows: slice | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(clean images (n, L, L), clean_variance (n,))`` of ``rows`` (:meth:`require_clean`): the
        ``clean`` arrays, or the images themselves when :attr:`images_are_clean`."""
        self.require_clean()
        if not self.has_clean:
            images = self.read_images(rows)
            return images, images.reshape(len(images), -1).astype(np.float64).var(axis=1).astype(np.float32)
        if isinstance(rows, slice):
            return self.group["clean"][rows], self.group["clean_variance"][rows]
        sel = (np.asarray(rows),)
        return (
            self.group["clean"].get_orthogonal_selection(sel),
            self.group["clean_variance"].get_orthogonal_selection(sel),
        )

    def read_images(self, rows: slice | np.ndarray) -> np.ndarray:
        arr = self.group["images"]
        if isinstance(rows, slice):
            return arr[rows]
        return arr.get_orthogonal_selection((np.asarray(rows),))

    def ctf_parameters(self, meta: dict) -> dict | None:
        """CTF parameters of rows read with :meth:`read_metadata` (``(n,)`` defoci plus the optics
        scalars), as :func:`cryoorient_ray.core.imaging.ctf.ctf_2d` takes them; None if no CTF was applied."""
        if not self.manifest.get("ctf_applied", False):
            return None
        optics = self.manifest.get("optics", {})
        return {
            "defocus_u": np.asarray(meta["defocus_u"], dtype=np.float64),
            "defocus_v": np.asarray(meta["defocus_v"], dtype=np.float64),
            "defocus_angle": np.asarray(meta["defocus_angle"], dtype=np.float64),
            "voltage": float(optics.get("voltage", 300.0)),
            "cs": float(optics.get("cs", 2.7)),
            "amplitude_contrast": float(optics.get("amplitude_contrast", 0.1)),
        }

    def particles(self, rows: np.ndarray) -> ParticleStack:
        """The particles ``rows``: images ``(n, L, L)`` float32 (numpy-backed), their shifts (None when
        all are zero), their CTF (:meth:`ctf_parameters`) and the store's pixel size."""
        from cryoorient_ray.core.imaging.particles import CTFParams, ParticleStack

        rows = np.asarray(rows)
        meta = self.read_metadata(rows, names=["shift", "defocus_u", "defocus_v", "defocus_angle"])
        shifts = np.asarray(meta["shift"], dtype=np.float32)
        ctf = self.ctf_parameters(meta)
        return ParticleStack(
            self.read_images(rows),
            shifts=shifts if np.abs(shifts).max(initial=0.0) > 0 else None,
            ctf=None if ctf is None else CTFParams.from_dict(ctf),
            pixel_size_A=self.pixel_size,
        )

    def to_dask(self):
        """The images as a dask array with one dask chunk per shard (for analysis)."""
        import dask.array as da

        return da.from_zarr(self.group["images"], chunks=(self.shard_size, self.image_size, self.image_size))

    def summary(self) -> dict:
        """Counts per protein and split, shard progress, shapes: what `cryoorient store info` prints."""
        m = self.manifest
        meta = self.read_metadata(names=["protein", "split"]) if m.get("metadata_written") else None
        proteins = []
        for k, p in enumerate(m.get("proteins", [])):
            row = {"name": p.get("name"), "symmetry": p.get("symmetry", "C1"), "heldout": bool(p.get("heldout"))}
            if meta is not None:
                mine = meta["protein"] == k
                row.update({s: int(np.sum(mine & (meta["split"] == c))) for s, c in SPLIT_CODES.items()})
            proteins.append(row)
        damaged = self.damaged_shards()
        done = self.done_shards()
        return {
            "path": self.path,
            "samples": int(m["n_samples"]),
            "image_size": int(m["image_size"]),
            "pixel_size": m.get("pixel_size"),
            "acquisition": self.acquisition,
            "shards_done": int(done.sum()),
            "shards": int(m["n_shards"]),
            "complete": self.is_complete,
            "damaged_shards": damaged,
            "has_orientations": bool(m.get("has_orientations", True)),
            "proteins": proteins,
        }
