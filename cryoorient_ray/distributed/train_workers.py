"""Data-parallel training of the Siamese distance with Ray Train (TorchTrainer, Train V2 API).

Driver (:func:`build_trainer`, :func:`train_distance`): checks the stores, builds the Ray Data
pair streams (train pairs of proteins seen in training, fresh pairs each epoch; fixed validation
pairs of seen proteins; validation pairs of held-out proteins when the stores have some) and the
:class:`WorkerSettings` of the run, starts ``num_workers`` workers, and after the run exports the
best weights as one file (``model.pt``) that later stages load without Ray.

Data (``train.data``): in ``memory`` the train images are materialised once on the driver and
every worker reads them whole at its start, then draws each pass's batches from tensors in an
order seeded by ``[seed, epoch, pass]`` (the same on every worker; each takes its part of every
global batch, :func:`~cryoorient_ray.distributed.data.batch_plan`), and holds its shard of the
fixed validation pairs, each distinct image embedded once per evaluation. With ``stream`` Ray
Data reads the store every pass (stores larger than memory). ``auto`` picks by size. Torch
threads are the whole CPUs Ray gave the worker (:func:`_worker_threads`).

Worker (:func:`train_loop_per_worker`): ``L_DE = mean |d̂ − d_q|²`` (rad²) with Adam or RMSprop
on its batches, metrics summed over workers, a checkpoint every epoch (model,
optimiser, epoch, step, history, best weights so far). When a worker dies, Ray Train restarts
the group (``FailureConfig(max_failures)``) and the loop resumes from the latest checkpoint.
Rank 0 writes TensorBoard scalars and the progress file.

The worker gets exactly one typed hand-off: :class:`WorkerSettings`, built on the driver from
the validated :class:`~cryoorient_ray.config.TrainConfig` (:func:`worker_settings`), sent through
``train_loop_config`` as ``dataclasses.asdict`` and rebuilt with ``WorkerSettings(**config)``.

:func:`build_trainer` and :func:`export_trained_model` are the two halves of
:func:`train_distance`; each Ray Tune trial (:mod:`cryoorient_ray.distributed.tune_trials`) uses
them too, so a trial trains exactly as ``cryoorient train`` does.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cryoorient_ray import __version__
from cryoorient_ray.config import PreprocessConfig, TrainConfig, TrainNoiseConfig
from cryoorient_ray.core.imaging.corruption import FreshCorruption
from cryoorient_ray.core.imaging.preprocess import Preprocess, estimate_ctf_wiener, estimate_preprocess, phase_flip
from cryoorient_ray.core.learning.model import SiameseDistance, SiameseSpec, save_distance_model
from cryoorient_ray.distributed.data import (
    GROUP_STRIDE,
    MemoryPairs,
    MemorySamples,
    PairSampling,
    batch_plan,
    grouped_order,
    memory_pairs,
    pair_dataset,
    sample_dataset,
)
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.store import ProjectionStore

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "state.pt"
PROGRESS_FILE = "progress.jsonl"


# ----------------------------------------------------------------------------- noise and preprocessing

PREPROCESS_SAMPLE = 1000  # clean train images the SNR-matched filter is estimated from


def fresh_corruption(store: ProjectionStore, noise: TrainNoiseConfig) -> FreshCorruption | None:
    """The fresh noise/CTF to draw on ``store``'s clean projections every batch, or None (train on
    the store's fixed images): ``noise.fresh`` null means yes when the store holds clean projections
    and noise or a CTF, or when ``noise.snr_db`` is given.

    Raises:
        CryoOrientError: fresh noise asked of a store without clean projections, an SNR that is not
            finite, a CTF asked of a store simulated without one.
    """
    acq = store.acquisition
    m = store.manifest
    store_ctf = bool(m.get("ctf_applied", False))
    corrupted = acq.get("snr_db") is not None or store_ctf
    fresh = noise.fresh
    if fresh is None:
        fresh = (store.has_clean and corrupted) or (noise.snr_db is not None and store.images_are_clean)
    if not fresh:
        return None
    store.require_clean()
    snr = noise.snr_db if noise.snr_db is not None else acq.get("snr_db")
    use_ctf = noise.ctf == "fresh" or (noise.ctf == "auto" and store_ctf)
    ctf = None
    if use_ctf:
        ranges = m.get("ctf_ranges") or ((m.get("config") or {}).get("ctf") if store_ctf else None)
        if not ranges:
            raise CryoOrientError(f"{store.path} was simulated without a CTF: there are no defocus ranges to draw from")
        optics = m.get("optics", {})
        ctf = {
            "defocus_min": float(ranges["defocus_min"]),
            "defocus_max": float(ranges["defocus_max"]),
            "astigmatism_max": float(ranges.get("astigmatism_max", 0.0)),
            **{k: float(v) for k, v in optics.items() if k in ("voltage", "cs", "amplitude_contrast")},
        }
    if snr is None and ctf is None and not noise.max_shift:
        return None  # nothing to draw: the clean images are the images
    return FreshCorruption(
        working_size=store.image_size,
        working_pixel_size=store.pixel_size,
        acquisition_size=int(acq["image_size"]),
        acquisition_pixel_size=float(acq.get("pixel_size") or store.pixel_size),
        snr_db=tuple(snr) if isinstance(snr, (list, tuple)) else snr,
        curriculum_start_db=noise.curriculum_start_db,
        curriculum_fraction=noise.curriculum_fraction,
        ctf=ctf,
        max_shift_px=noise.max_shift,
    )


def store_preprocess(
    store: ProjectionStore,
    rows: np.ndarray,
    corruption: FreshCorruption | None,
    pre: PreprocessConfig,
    seed: int = 0,
) -> Preprocess | None:
    """The preprocessing (:mod:`~cryoorient_ray.core.imaging.preprocess`) of a model trained on
    ``store``'s ``rows``: phase flipping when the images have a CTF (``pre.phase_flip`` auto), and
    the radial filter matched to the noise the network is trained at (the fresh noise at its
    target SNR, else the store's own noise), estimated from up to :data:`PREPROCESS_SAMPLE` rows;
    None when it would do nothing.

    Raises:
        CryoOrientError: phase flipping asked for images without a CTF.
    """
    m = store.manifest
    has_ctf = bool(m.get("ctf_applied", False)) if corruption is None else corruption.ctf is not None
    flip = has_ctf if pre.phase_flip == "auto" else bool(pre.phase_flip)
    if flip and not has_ctf:
        raise CryoOrientError("train.preprocess.phase_flip is on but the training images have no CTF")
    snr = store.acquisition.get("snr_db") if corruption is None else corruption.snr_range(1.0)
    if flip and pre.ctf_correction == "wiener":
        return _ctf_wiener(store, rows, corruption, snr, seed)
    if pre.filter == "none" or snr is None:
        if not flip:
            return None
        return Preprocess(store.image_size, store.pixel_size, True, "none", None, None)
    pick = _preprocess_sample(rows, seed)
    gen = torch.Generator().manual_seed(seed * 8191 + 1)
    if store.has_clean or store.images_are_clean:
        clean, clean_var = (torch.from_numpy(np.asarray(a)) for a in store.read_clean(pick))
        if corruption is None:  # the store's own noise (and CTF) at its SNR
            acq = store.acquisition
            corruption = FreshCorruption(
                store.image_size,
                store.pixel_size,
                int(acq["image_size"]),
                float(acq.get("pixel_size") or store.pixel_size),
                snr_db=acq.get("snr_db"),
                ctf=None if not has_ctf else {"defocus_min": 0.0, "defocus_max": 0.0, **m.get("optics", {})},
            )
            meta = store.read_metadata(pick, names=["defocus_u", "defocus_v", "defocus_angle"])
            ctf = store.ctf_parameters(meta)
            out = corruption.apply(clean, clean_var, 1.0, gen, ctf=ctf)
        else:
            out = corruption.apply(clean, clean_var, 1.0, gen)
        signal, ctf, noisy = out.signal, out.ctf, False
        noise_var = float(out.noise_variance_working.mean())
    else:  # fixed noisy images only: the noise power is subtracted from their spectrum
        meta = store.read_metadata(pick, names=["defocus_u", "defocus_v", "defocus_angle", "noise_variance"])
        signal = torch.from_numpy(np.asarray(store.read_images(pick), dtype=np.float32))
        ctf, noisy = store.ctf_parameters(meta), True
        noise_var = float(np.mean(meta["noise_variance"])) * float(store.acquisition["noise_variance_to_working"])
    if flip:
        signal = phase_flip(signal, store.pixel_size, ctf)
    target = _target_snr(snr)
    return estimate_preprocess(signal, noise_var, store.pixel_size, pre.filter, flip, snr_db=target, noisy=noisy)


def _preprocess_sample(rows: np.ndarray, seed: int) -> np.ndarray:
    """The (sorted) rows, at most :data:`PREPROCESS_SAMPLE`, a preprocessing is estimated from."""
    rng = np.random.default_rng([seed, 8191])
    return np.sort(rng.choice(rows, size=min(len(rows), PREPROCESS_SAMPLE), replace=False))


def _target_snr(snr) -> float | None:
    """The SNR (dB) a preprocessing records: the training SNR, or the middle of its range."""
    return snr if not isinstance(snr, (tuple, list)) else float(np.mean(snr))


def _ctf_wiener(store: ProjectionStore, rows: np.ndarray, corruption, snr, seed: int) -> Preprocess:
    """:func:`store_preprocess`'s Wiener CTF correction: the clean spectrum (before the CTF) of up to
    :data:`PREPROCESS_SAMPLE` rows against the white noise the network is trained at."""
    if not (store.has_clean or store.images_are_clean):
        raise CryoOrientError(
            "train.preprocess.ctf_correction wiener needs the clean projections; this store has none "
            "(simulate it again, or use ctf_correction: flip)"
        )
    pick = _preprocess_sample(rows, seed)
    clean, clean_var = (torch.from_numpy(np.asarray(a)) for a in store.read_clean(pick))
    noise_var = 0.0
    if snr is not None:
        if corruption is None:
            meta = store.read_metadata(pick, names=["noise_variance"])
            noise_var = float(np.mean(meta["noise_variance"])) * float(store.acquisition["noise_variance_to_working"])
        else:
            gen = torch.Generator().manual_seed(seed * 8191 + 1)
            meta = store.read_metadata(pick, names=["defocus_u", "defocus_v", "defocus_angle"])
            out = corruption.apply(clean, clean_var, 1.0, gen, ctf=store.ctf_parameters(meta))
            noise_var = float(out.noise_variance_working.mean())
    target = _target_snr(snr)
    return estimate_ctf_wiener(clean, noise_var, store.pixel_size, snr_db=target)


# ----------------------------------------------------------------------------- the hand-off


@dataclass(frozen=True)
class Augmentation:
    """On-the-fly augmentation of training images (:class:`~cryoorient_ray.config.AugmentConfig`).

    ``max_shift``: random integer shifts up to this many pixels (zero fill). Noise is not an
    augmentation but :class:`~cryoorient_ray.core.imaging.corruption.FreshCorruption` (``train.noise``).
    """

    max_shift: int = 0


@dataclass(frozen=True)
class FaultInjection:
    """Testing hook: worker ``rank`` kills itself once, at the start of ``epoch``, after writing ``marker``.

    It waits ``delay_s`` seconds first so that Ray Train's controller has collected the previous
    epoch's report (it polls workers): a report still queued in a dying worker is lost, and the
    restart would find no checkpoint. Once ``marker`` exists the hook does nothing.
    """

    epoch: int
    marker: str
    rank: int = 0
    delay_s: float = 6.0


@dataclass(frozen=True)
class WorkerSettings:
    """Everything one Ray Train worker needs, and nothing else (see the module docstring).

    Attributes:
        model: the architecture. optimizer: ``adam`` or ``rmsprop``; lr: base learning rate;
            weight_decay: L2 coefficient; lr_schedule: ``constant`` or ``cosine`` (:func:`lr_factor`).
        total_steps: optimiser steps per worker over the whole run (an estimate), for the schedule.
        epochs: epochs to run; passes_per_epoch: passes over the train split per epoch.
        pairing: ``batch`` (all pairs within an image batch) or ``stream`` (pre-drawn pairs).
        data: ``memory`` (every worker reads the train images once and draws its batches from
            memory, in a seeded order) or ``stream`` (Ray Data streams them every pass).
        pairs_per_shard: stream pairing's pairs per shard and pass (None: the shard's rows).
        batch_size: images (batch) or pairs (stream) per step per worker.
        mixed_precision: bf16 autocast (on CUDA only).
        augment: on-the-fly augmentation, or None.
        symmetry: point group per protein group key ``store_id * GROUP_STRIDE + protein``.
        has_heldout: the stores hold held-out proteins (a ``heldout`` dataset is evaluated).
        threads: torch threads of the worker when Ray does not say how many CPUs it gave it
            (:func:`_worker_threads`); seed: seeds the initial weights, the memory data order
            (``[seed, epoch, pass]``) and the augmentation (``seed * 7919 + rank``).
        tensorboard_dir, progress_file: written by rank 0 (TensorBoard events; one JSON line per epoch).
        fault_injection: testing hook, or None.
        corruption: fresh noise/CTF drawn on the clean train images every batch
            (``FreshCorruption.to_dict()``), or None (the store's fixed images).
        preprocess: what every image goes through before the network (``Preprocess.to_dict()``):
            applied here to freshly corrupted batches, by the readers to fixed images; or None.
        init_model: fine-tuning: the absolute path of a ``model.pt`` whose weights the model starts
            from (:func:`_load_init_weights`; a checkpoint of the run, when there is one, wins), or None.
    """

    model: SiameseSpec
    optimizer: str
    lr: float
    weight_decay: float
    lr_schedule: str
    total_steps: int
    epochs: int
    passes_per_epoch: int
    pairing: str
    data: str
    pairs_per_shard: int | None
    batch_size: int
    mixed_precision: bool
    augment: Augmentation | None
    symmetry: dict[int, str]
    has_heldout: bool
    threads: int
    seed: int
    tensorboard_dir: str
    progress_file: str
    fault_injection: FaultInjection | None
    corruption: dict | None = None
    preprocess: dict | None = None
    init_model: str | None = None

    def __post_init__(self) -> None:
        # rebuilt from dataclasses.asdict in the worker: the nested settings arrive as dicts
        for name, kind in (("model", SiameseSpec), ("augment", Augmentation), ("fault_injection", FaultInjection)):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, kind(**value))


def _augment(images: torch.Tensor, aug: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """``images (B, L, L)`` shifted as ``aug`` says (draws from ``generator``)."""
    if aug.max_shift:
        m = int(aug.max_shift)
        b, n = images.shape[0], images.shape[-1]
        padded = torch.nn.functional.pad(images, (m, m, m, m))
        dx = torch.randint(-m, m + 1, (b,), generator=generator)
        dy = torch.randint(-m, m + 1, (b,), generator=generator)
        images = torch.stack([padded[k, m - dy[k] : m - dy[k] + n, m - dx[k] : m - dx[k] + n] for k in range(b)])
    return images


def batch_pair_loss(
    emb: torch.Tensor,
    quat: torch.Tensor,
    groups: torch.Tensor,
    symmetry: dict[int, str],
    distance,
    n_bins: int = 32,
) -> tuple[torch.Tensor, int]:
    """L_DE over all pairs ``i < j`` of one image batch that share a group (protein), each distance
    bin of [0, π] given equal total weight (the uniform-distance resampling, as weights).

    Args:
        emb: ``(B, n)`` embeddings; quat: ``(B, 4)`` true orientations (wxyz); groups: ``(B,)`` protein keys;
        symmetry: point group per group key; distance: the model's head, ``(emb_i, emb_j) -> d̂``.
    """
    from cryoorient_ray.core.learning.pairs import distance_bins, pair_distances

    b = emb.shape[0]
    iu, ju = torch.triu_indices(b, b, offset=1)
    same = groups[iu] == groups[ju]
    iu, ju = iu[same], ju[same]
    if len(iu) == 0:
        return emb.sum() * 0.0, 0
    d = pair_distances(quat.double().numpy(), iu.numpy(), ju.numpy(), groups.numpy(), symmetry)
    bins = distance_bins(d, n_bins)
    weight = 1.0 / np.bincount(bins, minlength=n_bins)[bins]
    weight = torch.as_tensor(weight / weight.sum(), dtype=emb.dtype, device=emb.device)
    target = torch.as_tensor(d, dtype=emb.dtype, device=emb.device)
    pred = distance(emb[iu], emb[ju])
    return torch.sum(weight * (pred - target) ** 2), len(iu)


def lr_factor(step: int, total_steps: int, schedule: str, warmup: float = 0.05, floor: float = 0.01) -> float:
    """Multiplier of the base learning rate at optimiser ``step`` (0-based) of ``total_steps``.

    ``"constant"``: 1. ``"cosine"``: linear warm-up over the first ``warmup`` fraction of the
    steps, then a cosine decay to ``floor``. Past ``total_steps`` (an estimate when the pair stream
    is not a fixed size) it stays at ``floor``.
    """
    if schedule == "constant" or total_steps <= 0:
        return 1.0
    n_warm = max(1, int(warmup * total_steps))
    if step < n_warm:
        return (step + 1) / n_warm
    t = min(1.0, (step - n_warm) / max(1, total_steps - n_warm))
    return floor + (1.0 - floor) * 0.5 * (1.0 + np.cos(np.pi * t))


def _all_reduce(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def _pair_errors_stream(w: _Worker, name: str) -> tuple[float, float, float]:
    """(Σ err², Σ |err|, pairs) of this worker's shard of the Ray Data pair set ``name``."""
    sq = ab = n = 0.0
    shard = ray.train.get_dataset_shard(name)
    for batch in shard.iter_torch_batches(batch_size=w.settings.batch_size, device=w.device):
        pred = w.model(batch["image_i"].float(), batch["image_j"].float())
        err = pred - batch["distance"].float()
        sq += float((err * err).sum())
        ab += float(err.abs().sum())
        n += len(err)
    return sq, ab, n


def _pair_errors_memory(w: _Worker, pairs: MemoryPairs) -> tuple[float, float, float]:
    """(Σ err², Σ |err|, pairs) of pairs held in memory: each distinct image embedded once."""
    if len(pairs) == 0:
        return 0.0, 0.0, 0.0
    chunk = max(256, 2 * w.settings.batch_size)
    emb = torch.cat([w.model(pairs.images[k : k + chunk]).float() for k in range(0, len(pairs.images), chunk)])
    err = w.core.distance(emb[pairs.left], emb[pairs.right]) - pairs.distance
    return float((err * err).sum()), float(err.abs().sum()), float(len(err))


def _evaluate(w: _Worker, name: str) -> tuple[float, float, int]:
    """(L_DE, mean |error|, pairs) of the validation set ``name``, summed over all workers."""
    w.model.eval()
    with torch.no_grad(), torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=w.use_amp):
        if name in w.eval_data:
            sq, ab, n = _pair_errors_memory(w, w.eval_data[name])
        else:
            sq, ab, n = _pair_errors_stream(w, name)
    sq, ab, n = _all_reduce([sq, ab, n])
    return (sq / n if n else float("nan")), (ab / n if n else float("nan")), int(n)


# ----------------------------------------------------------------------------- the worker


@dataclass
class _LoopState:
    """What a checkpoint carries from one epoch to the next, and across a restart of the group."""

    start_epoch: int = 0
    step: int = 0  # optimiser steps so far (the learning-rate schedule's clock)
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val_loss": float("inf"), "epoch": -1, "state": None})
    resumed_from: int = -1  # epoch of the checkpoint this run resumed from, -1 when it started afresh
    initial_val: float | None = None  # the start model's validation L_DE (untrained, or train.init_model)


@dataclass
class _Worker:
    """One worker's model (``model`` as prepared by Ray Train, ``core`` the unwrapped module) and tools."""

    settings: WorkerSettings
    model: torch.nn.Module
    core: SiameseDistance
    opt: torch.optim.Optimizer
    device: torch.device
    rank: int
    world_size: int
    use_amp: bool
    generator: torch.Generator
    corruption: FreshCorruption | None = None  # fresh noise/CTF on the clean train images
    preprocess: Preprocess | None = None  # applied to freshly corrupted batches
    train_data: MemorySamples | None = None  # data "memory": the train images, read once
    eval_data: dict[str, MemoryPairs] = field(default_factory=dict)  # data "memory": the fixed pair sets


def _make_optimizer(model: torch.nn.Module, s: WorkerSettings) -> torch.optim.Optimizer:
    kind = torch.optim.RMSprop if s.optimizer == "rmsprop" else torch.optim.Adam
    return kind(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)


def _load_init_weights(model: torch.nn.Module, path: str) -> None:
    """Fine-tuning: the weights of the ``model.pt`` at ``path`` (same architecture: the driver took
    the spec from that file, :func:`training_spec`), loaded in place."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(payload["state_dict"])


def _restore(model: torch.nn.Module, opt: torch.optim.Optimizer) -> _LoopState:
    """The loop state of the latest checkpoint (model and optimiser loaded in place), else a fresh one."""
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return _LoopState()
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return _LoopState(
        start_epoch=state["epoch"] + 1,
        step=int(state.get("step", 0)),  # checkpoints written before the step counter have none
        history=state["history"],
        best=state["best"],
        resumed_from=state["epoch"],
    )


def _worker_threads(fallback: int) -> int:
    """Torch threads for this worker: the CPUs Ray gave it (whole ones, at least 1, at most the
    machine's), so workers and read tasks on one node never oversubscribe it."""
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # not in a Ray worker (e.g. a test calling the loop directly)
        cpus = None
    n = int(cpus + 1e-6) if cpus else fallback
    return max(1, min(n, os.cpu_count() or 1))


def _load_memory_data(w: _Worker) -> None:
    """Data "memory": read the train set (all of it, every worker) and this worker's shard of the
    fixed validation sets once; the loop then draws from these tensors."""
    w.train_data = MemorySamples.load(ray.train.get_dataset_shard("train"))
    if w.device.type != "cpu":
        w.train_data.images = w.train_data.images.to(w.device)
    for name in ("val", "heldout") if w.settings.has_heldout else ("val",):
        pairs = MemoryPairs.load(ray.train.get_dataset_shard(name))
        if w.device.type != "cpu":
            pairs = MemoryPairs(*(x.to(w.device) for x in (pairs.images, pairs.left, pairs.right, pairs.distance)))
        w.eval_data[name] = pairs


def _start_worker(s: WorkerSettings) -> tuple[_Worker, _LoopState]:
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(_worker_threads(s.threads))
    device = ray.train.torch.get_device()
    torch.manual_seed(s.seed)  # the same initial weights for the same seed (DDP then broadcasts rank 0's)
    model = SiameseDistance(s.model)
    if s.init_model:  # fine-tuning: start from a trained model (a checkpoint of this run, below, wins)
        _load_init_weights(model, s.init_model)
    opt = _make_optimizer(model, s)
    state = _restore(model, opt)
    prepared = ray.train.torch.prepare_model(model)
    worker = _Worker(
        settings=s,
        model=prepared,
        core=prepared.module if hasattr(prepared, "module") else prepared,
        opt=opt,
        device=device,
        rank=rank,
        world_size=ctx.get_world_size(),
        use_amp=s.mixed_precision and device.type == "cuda",
        generator=torch.Generator().manual_seed(s.seed * 7919 + rank),
        corruption=FreshCorruption.from_dict(s.corruption) if s.corruption else None,
        preprocess=Preprocess.from_dict(s.preprocess),
    )
    if s.data == "memory":
        _load_memory_data(worker)
    return worker, state


def _die_if_asked(fault: FaultInjection | None, rank: int, epoch: int) -> None:
    """The :class:`FaultInjection` testing hook: this worker dies mid-training."""
    if fault is None or rank != fault.rank or epoch != fault.epoch or Path(fault.marker).exists():
        return
    time.sleep(fault.delay_s)
    Path(fault.marker).write_text(f"killed at epoch {epoch}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def _pass_batches(w: _Worker, epoch: int, pass_index: int):
    """The batches of one pass over the train split: ``images``, ``quaternion``, ``groups`` (batch
    pairing) or ``image_i``, ``image_j``, ``distance`` (stream pairing), from memory in the order
    seeded by ``[seed, epoch, pass]`` (the same on every worker), or from the Ray Data stream."""
    s = w.settings
    if w.train_data is None:
        for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=s.batch_size, device=w.device):
            if s.pairing == "batch":
                batch["groups"] = batch["store_id"].long() * GROUP_STRIDE + batch["protein"].long()
            yield batch
        return
    data = w.train_data
    rng = np.random.default_rng([s.seed, epoch, pass_index])
    if s.pairing == "batch":
        for idx in batch_plan(grouped_order(data.group, rng), s.batch_size, w.world_size, w.rank):
            rows = torch.from_numpy(idx)
            batch = {
                "images": data.images[rows.to(data.images.device)],
                "quaternion": torch.from_numpy(data.quaternion[idx]),
                "groups": torch.from_numpy(data.group[idx]),
            }
            if data.clean_variance is not None:
                batch["clean_variance"] = data.clean_variance[rows]
            yield batch
        return
    sampling = PairSampling("train", "seen", s.pairs_per_shard)  # as pair_dataset draws them (fresh pairs)
    i, j, d = memory_pairs(data, s.symmetry, sampling, rng)
    dev = data.images.device
    for idx in batch_plan(np.arange(len(d)), s.batch_size, w.world_size, w.rank):
        batch = {
            "image_i": data.images[torch.from_numpy(i[idx]).to(dev)],
            "image_j": data.images[torch.from_numpy(j[idx]).to(dev)],
            "distance": torch.from_numpy(d[idx]).to(dev),
        }
        if data.clean_variance is not None:
            batch["clean_variance_i"] = data.clean_variance[torch.from_numpy(i[idx])]
            batch["clean_variance_j"] = data.clean_variance[torch.from_numpy(j[idx])]
        yield batch


def _fresh(w: _Worker, images: torch.Tensor, clean_variance: torch.Tensor, progress: float) -> torch.Tensor:
    """Clean ``images`` with fresh noise/CTF (:attr:`_Worker.corruption`), then the model's preprocessing."""
    out = w.corruption.apply(images, clean_variance.cpu(), progress, w.generator)
    return out.images if w.preprocess is None else w.preprocess.apply(out.images, out.ctf)


def _batch_loss(w: _Worker, batch: dict, progress: float = 1.0) -> tuple[torch.Tensor, int]:
    """``(L_DE, pairs)`` of one batch (:func:`_pass_batches`): all same-protein pairs of the images
    (batch pairing), or the batch's pre-drawn pairs (stream pairing). With fresh noise the batch's
    clean images are corrupted afresh (``progress``: the fraction of training done, for a curriculum)."""
    s = w.settings
    if s.pairing == "batch":
        x = batch["images"].float()
        if w.corruption is not None:
            x = _fresh(w, x, batch["clean_variance"], progress)
        if s.augment:
            x = _augment(x, s.augment, w.generator)
        with torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=w.use_amp):
            emb = w.model(x)  # one argument: embeddings, through DDP so gradients are synchronised
        return batch_pair_loss(
            emb.float(), batch["quaternion"].cpu(), batch["groups"].cpu(), s.symmetry, w.core.distance
        )
    xi, xj = batch["image_i"].float(), batch["image_j"].float()
    if w.corruption is not None:
        xi = _fresh(w, xi, batch["clean_variance_i"], progress)
        xj = _fresh(w, xj, batch["clean_variance_j"], progress)
    if s.augment:
        xi, xj = _augment(xi, s.augment, w.generator), _augment(xj, s.augment, w.generator)
    with torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=w.use_amp):
        pred = w.model(xi, xj)
    return torch.mean((pred.float() - batch["distance"].float()) ** 2), len(pred)


def _train_epoch(w: _Worker, state: _LoopState, epoch: int) -> tuple[float, int, dict]:
    """One epoch of optimiser steps; ``(sum of L_DE × pairs, pairs)`` over all workers, and this
    worker's time waiting for batches (``data_seconds``), in the steps (``compute_seconds``) and the
    CPU time of its process over the epoch (``cpu_seconds``, all its threads)."""
    s = w.settings
    w.model.train()
    sq = n = 0.0
    timing = {"data_seconds": 0.0, "compute_seconds": 0.0}
    cpu0 = time.process_time()
    for pass_index in range(s.passes_per_epoch):
        batches = _pass_batches(w, epoch, pass_index)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            t1 = time.perf_counter()
            timing["data_seconds"] += t1 - t0
            if batch is None:
                break
            loss, pairs = _batch_loss(w, batch, state.step / max(1, s.total_steps))
            factor = lr_factor(state.step, s.total_steps, s.lr_schedule)
            for group in w.opt.param_groups:
                group["lr"] = s.lr * factor
            w.opt.zero_grad(set_to_none=True)
            loss.backward()
            w.opt.step()
            state.step += 1
            sq += float(loss.detach()) * pairs
            n += pairs
            timing["compute_seconds"] += time.perf_counter() - t1
    timing["cpu_seconds"] = time.process_time() - cpu0
    sq, n = _all_reduce([sq, n])
    return sq, int(n), timing


def _epoch_metrics(w: _Worker, state: _LoopState, epoch: int, t0: float, sq: float, n: int, timing: dict) -> dict:
    """The epoch's line of the history: training L_DE (rad²), throughput and where the time went
    (rank 0's ``data_seconds``, ``compute_seconds``, ``cpu_seconds``, ``eval_seconds``, torch
    ``threads``), then the validation sets."""
    metrics = {
        "epoch": epoch,
        "train_loss": sq / n if n else float("nan"),
        "train_pairs": n,
        "seconds": time.perf_counter() - t0,
        "steps": state.step,
        "lr": w.opt.param_groups[0]["lr"],
        "pairs_per_second_per_worker": n / max(1e-9, time.perf_counter() - t0) / w.world_size,
        "resumed_from_epoch": state.resumed_from,
        "threads": torch.get_num_threads(),
        **{k: round(v, 3) for k, v in timing.items()},
    }
    if state.initial_val is not None and epoch == 0:
        metrics["initial_val_loss"] = state.initial_val
    t_eval = time.perf_counter()
    metrics["val_loss"], metrics["val_mae"], metrics["val_pairs"] = _evaluate(w, "val")
    if w.settings.has_heldout:
        metrics["heldout_loss"], metrics["heldout_mae"], metrics["heldout_pairs"] = _evaluate(w, "heldout")
    metrics["eval_seconds"] = round(time.perf_counter() - t_eval, 3)
    return metrics


def _write_scalars(writer, metrics: dict, epoch: int) -> None:
    for key in ("train_loss", "val_loss", "val_mae", "heldout_loss", "heldout_mae"):
        if key in metrics:
            writer.add_scalar(f"L_DE/{key}" if "loss" in key else f"MAE/{key}", metrics[key], epoch)
    writer.flush()


def _report(w: _Worker, state: _LoopState, metrics: dict) -> None:
    """``ray.train.report`` of the epoch, with rank 0's checkpoint of the loop state."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if w.rank == 0:
            payload = {
                "model": w.core.state_dict(),
                "optimizer": w.opt.state_dict(),
                "epoch": metrics["epoch"],
                "step": state.step,
                "history": state.history,
                "best": state.best,
                "spec": w.settings.model.to_dict(),
            }
            torch.save(payload, Path(tmp) / CHECKPOINT_FILE)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def _end_epoch(w: _Worker, state: _LoopState, metrics: dict, writer) -> None:
    """Record the epoch: history and best weights, rank 0's progress line and scalars, the report."""
    epoch = metrics["epoch"]
    state.history.append(metrics)
    if metrics["val_loss"] < state.best["val_loss"]:
        state_cpu = {k: v.detach().cpu().clone() for k, v in w.core.state_dict().items()}
        state.best = {"val_loss": metrics["val_loss"], "epoch": epoch, "state": state_cpu}
    if w.rank == 0:
        with open(w.settings.progress_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(metrics) + "\n")
    if writer is not None:
        _write_scalars(writer, metrics, epoch)
    _report(w, state, metrics)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker; ``config`` is ``dataclasses.asdict`` of a :class:`WorkerSettings`."""
    s = WorkerSettings(**config)
    w, state = _start_worker(s)
    writer = None
    if w.rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(s.tensorboard_dir)
    if state.start_epoch == 0:  # the start model's validation L_DE (untrained or init_model): the curve's start
        state.initial_val = _evaluate(w, "val")[0]
    for epoch in range(state.start_epoch, s.epochs):
        _die_if_asked(s.fault_injection, w.rank, epoch)
        t0 = time.perf_counter()
        sq, n, timing = _train_epoch(w, state, epoch)
        metrics = _epoch_metrics(w, state, epoch, t0, sq, n, timing)
        _end_epoch(w, state, metrics, writer)
    if writer is not None:
        writer.close()


def _fit_with_progress(trainer: TorchTrainer, progress_file: Path, epochs: int, show: bool):
    """``trainer.fit()`` in a thread while a progress bar follows the epochs rank 0 appends to
    ``progress_file`` (a local file; on a cluster whose workers do not share it the bar just waits)."""
    import threading

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    box: dict = {}

    def run() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    columns = (
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, disable=not show) as bar:
        task = bar.add_task("training", total=epochs, status="starting workers")
        while thread.is_alive():
            thread.join(timeout=1.0)
            if progress_file.exists():
                lines = progress_file.read_text(encoding="utf-8").splitlines()
                if lines:
                    last = json.loads(lines[-1])
                    status = f"L_DE train {last['train_loss']:.3f} val {last['val_loss']:.3f}"
                    if "heldout_loss" in last:
                        status += f" held-out {last['heldout_loss']:.3f}"
                    bar.update(task, completed=last["epoch"] + 1, status=status)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _root_error(exc: BaseException) -> str:
    """The innermost ``SomeError: message`` line of a Ray error, else the first line."""
    import re

    text = str(exc)
    found = re.findall(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception): .+)$", text, flags=re.M)
    found = [f for f in found if not f.startswith(("WorkerGroupError", "RayTaskError", "UserCodeException"))]
    return found[-1].strip() if found else f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# ----------------------------------------------------------------------------- the driver


@dataclass(frozen=True)
class TrainJob:
    """One training run: the validated train settings, the stores it trains on and where it writes.

    ``out_dir`` receives the TensorBoard logs, the progress file and the Ray Train checkpoints
    (``ray_train/<name>``: a run restarted with the same ``out_dir`` and ``name`` resumes from its
    last checkpoint). ``seed`` fixes the validation pairs and the augmentation draws.
    """

    cfg: TrainConfig
    stores: list[str]
    out_dir: str | os.PathLike
    seed: int = 0
    name: str = "train"
    fault_injection: FaultInjection | None = None


@dataclass
class TrainRun:
    """A Ray Train run ready to fit: the trainer and what exporting its result needs."""

    trainer: TorchTrainer
    job: TrainJob
    spec: SiameseSpec
    manifests: list[ProjectionStore]
    out: Path
    settings: WorkerSettings | None = None


def open_training_stores(stores: list[str], spec: SiameseSpec) -> list[ProjectionStore]:
    """The stores, each checked: complete, with true orientations, images large enough for ``spec``."""
    if not stores:
        raise CryoOrientError("no projection store to train on")
    manifests = []
    for path in stores:
        st = ProjectionStore.open(path)
        if not st.is_complete:
            raise CryoOrientError(f"{path} is incomplete; finish it with the same `cryoorient simulate` command")
        if not st.manifest.get("has_orientations", True):
            raise CryoOrientError(f"{path} has no true orientations, so it cannot train a distance")
        if st.image_size < spec.min_image_size:
            raise CryoOrientError(
                f"{path} has {st.image_size}² images; the model's {len(spec.channels)} pooling blocks need "
                f"at least {spec.min_image_size}² (use fewer channels blocks or larger images)"
            )
        manifests.append(st)
    return manifests


def _has_heldout(manifests: list[ProjectionStore]) -> bool:
    return any(p.get("heldout") for st in manifests for p in st.proteins)


def _steps_per_epoch(cfg: TrainConfig, manifests: list[ProjectionStore]) -> int:
    """Optimiser steps per worker and epoch, for the learning-rate schedule (an estimate: the stream
    is split across workers by blocks, and stream pairing draws ``pairs_per_shard`` pairs per shard)."""
    n_rows = 0
    for st in manifests:
        rows = st.select_rows(split="train", proteins="seen")
        if cfg.pairing == "stream" and cfg.pairs_per_shard:
            n_rows += cfg.pairs_per_shard * len(np.unique(rows // st.shard_size))
        else:
            n_rows += len(rows)
    return max(1, int(np.ceil(n_rows / (cfg.batch_size * cfg.num_workers)))) * cfg.passes_per_epoch


def data_mode(cfg: TrainConfig, manifests: list[ProjectionStore]) -> str:
    """``memory`` or ``stream``: ``cfg.data``, with ``auto`` resolved by the size of the train images
    (float32) against ``cfg.memory_gb`` (every worker holds all of them)."""
    if cfg.data != "auto":
        return cfg.data
    n_bytes = sum(len(st.select_rows(split="train", proteins="seen")) * st.image_size**2 * 4 for st in manifests)
    return "memory" if n_bytes <= cfg.memory_gb * 1e9 else "stream"


def noise_and_preprocess(
    cfg: TrainConfig, manifests: list[ProjectionStore], seed: int = 0
) -> tuple[FreshCorruption | None, Preprocess | None]:
    """The fresh corruption (:func:`fresh_corruption`) and preprocessing (:func:`store_preprocess`) of
    a run, from its first store (every store must then share its geometry and noise record)."""
    first = manifests[0]
    corruption = fresh_corruption(first, cfg.noise)
    for st in manifests[1:]:
        same = (st.image_size, st.pixel_size, st.acquisition.get("image_size"), st.acquisition.get("snr_db")) == (
            first.image_size,
            first.pixel_size,
            first.acquisition.get("image_size"),
            first.acquisition.get("snr_db"),
        )
        if not same:
            raise CryoOrientError(
                f"{st.path} and {first.path} differ in box, pixel size or noise: one model's noise and "
                "preprocessing cannot match both (train on stores simulated alike)"
            )
        if corruption is not None:
            st.require_clean()
    rows = first.select_rows(split="train", proteins="seen")
    pre = store_preprocess(first, rows, corruption, cfg.preprocess, seed)
    return corruption, pre


def training_spec(cfg: TrainConfig) -> SiameseSpec:
    """The architecture a run trains: ``cfg.model``, or with ``cfg.init_model`` (fine-tuning) that
    model's own ``spec``, which wins over a ``train.model`` set to something else (with a warning).

    Raises:
        CryoOrientError: the init model is missing or not a model file.
    """
    if not cfg.init_model:
        return SiameseSpec(**cfg.model.model_dump())
    from cryoorient_ray.config import ModelConfig
    from cryoorient_ray.core.learning.model import load_distance_model

    model, _ = load_distance_model(cfg.init_model)
    asked = cfg.model.model_dump()
    if asked != ModelConfig().model_dump() and asked != {k: v for k, v in model.spec.to_dict().items() if k in asked}:
        log.warning(
            "train.init_model %s: its architecture (%s) is used, not train.model (%s)",
            cfg.init_model,
            model.spec.to_dict(),
            asked,
        )
    return model.spec


def worker_settings(job: TrainJob, manifests: list[ProjectionStore], spec: SiameseSpec | None = None) -> WorkerSettings:
    """The :class:`WorkerSettings` of ``job`` on its opened stores (:func:`open_training_stores`);
    ``spec``: the architecture (default :func:`training_spec` of ``job.cfg``)."""
    cfg, out = job.cfg, Path(job.out_dir).resolve()
    augment = cfg.augment
    corruption, pre = noise_and_preprocess(cfg, manifests, job.seed)
    return WorkerSettings(
        model=spec or training_spec(cfg),
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        lr_schedule=cfg.lr_schedule,
        total_steps=_steps_per_epoch(cfg, manifests) * cfg.epochs,
        epochs=cfg.epochs,
        passes_per_epoch=cfg.passes_per_epoch,
        pairing=cfg.pairing,
        data=data_mode(cfg, manifests),
        pairs_per_shard=cfg.pairs_per_shard,
        batch_size=cfg.batch_size,
        mixed_precision=cfg.mixed_precision,
        augment=Augmentation(augment.max_shift) if augment.max_shift else None,
        symmetry={
            sid * GROUP_STRIDE + k: p.get("symmetry", "C1")
            for sid, st in enumerate(manifests)
            for k, p in enumerate(st.proteins)
        },
        has_heldout=_has_heldout(manifests),
        threads=max(1, int(cfg.cpus_per_worker + 1e-6)),
        seed=job.seed,
        tensorboard_dir=str(out / "tensorboard"),
        progress_file=str(out / PROGRESS_FILE),
        fault_injection=job.fault_injection,
        corruption=None if corruption is None else corruption.to_dict(),
        preprocess=None if pre is None else pre.to_dict(),
        init_model=os.path.abspath(cfg.init_model)
        if cfg.init_model and "://" not in cfg.init_model
        else cfg.init_model,
    )


def _datasets(job: TrainJob, settings: WorkerSettings) -> dict:
    """The Ray Data sets of the run: ``train`` and the fixed (seeded) ``val`` and ``heldout`` pairs.

    Data ``stream``: ``train`` is read afresh every pass (batch pairing: the shards' images, shuffled
    within each shard; stream pairing: fresh pairs per shard). Data ``memory``: ``train`` is the
    train images, materialised here once, which every worker reads whole (:func:`_load_memory_data`).
    """
    cfg, stores, seed = job.cfg, job.stores, job.seed
    # fresh noise: the train split's clean images (corrupted and preprocessed in the worker, batch by
    # batch); fixed images: preprocessed as they are read. Validation: the stores' fixed noisy images.
    fresh = settings.corruption is not None
    kw = {"clean": True} if fresh else {"preprocess": settings.preprocess}
    if settings.data == "memory":
        train = sample_dataset(stores, "train", proteins="seen", **kw).materialize()
    elif cfg.pairing == "batch":
        train = sample_dataset(stores, "train", proteins="seen", shuffle=True, **kw)
    else:
        train = pair_dataset(stores, "train", proteins="seen", pairs_per_shard=cfg.pairs_per_shard, seed=None, **kw)
    # validation pairs are fixed (seeded): draw them once, not again every epoch
    val_pairs = cfg.val_pairs_per_shard
    pre = settings.preprocess
    datasets = {
        "train": train,
        "val": pair_dataset(
            stores, "val", proteins="seen", pairs_per_shard=val_pairs, seed=seed + 1, preprocess=pre
        ).materialize(),
    }
    if settings.has_heldout:
        datasets["heldout"] = pair_dataset(
            stores, "val", proteins="heldout", pairs_per_shard=val_pairs, seed=seed + 2, preprocess=pre
        ).materialize()
    return datasets


def _data_config(settings: WorkerSettings, datasets: dict) -> DataConfig:
    """Which datasets Ray Train splits across the workers: all of them when streaming; in memory
    every worker gets the whole train set (it draws its part of each global batch itself)."""
    if settings.data == "memory":
        return DataConfig(datasets_to_split=[k for k in datasets if k != "train"])
    return DataConfig()


def build_trainer(job: TrainJob, callbacks: list | None = None) -> TrainRun:
    """Check the stores and build the ``TorchTrainer`` that trains the distance on them.

    Shared by :func:`train_distance` and each Ray Tune trial (:mod:`cryoorient_ray.distributed.tune_trials`),
    so both train the same way. ``callbacks`` are Ray Train callbacks (e.g. Tune's
    ``TuneReportCallback``, which forwards every epoch's metrics to the trial).
    """
    cfg = job.cfg
    out = Path(job.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    spec = training_spec(cfg)
    manifests = open_training_stores(job.stores, spec)
    settings = worker_settings(job, manifests, spec)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    datasets = _datasets(job, settings)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(settings),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        datasets=datasets,
        dataset_config=_data_config(settings, datasets),
        run_config=ray.train.RunConfig(
            name=job.name,
            storage_path=train_storage_path(cfg, out),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
        ),
    )
    return TrainRun(trainer, job, spec, manifests, out, settings)


def train_storage_path(cfg: TrainConfig, out: Path) -> str:
    """Ray Train's storage: ``train.storage_path`` (an absolute folder, or a URL as given), else ``out/ray_train``."""
    if not cfg.storage_path:
        return str(out / "ray_train")
    if "://" in cfg.storage_path:
        return cfg.storage_path
    return str(Path(cfg.storage_path).expanduser().resolve())


def train_distance(job: TrainJob, progress: bool = True) -> dict:
    """Train on ``job.stores`` and write ``model.pt``, ``history.json`` and TensorBoard logs into ``job.out_dir``.

    Ray must be initialised. Returns the summary written to ``train_summary.json``.
    """
    run = build_trainer(job)
    progress_file = run.out / PROGRESS_FILE
    t0 = time.perf_counter()
    progress_file.unlink(missing_ok=True)
    try:
        result = _fit_with_progress(run.trainer, progress_file, job.cfg.epochs, progress)
    except Exception as exc:
        raise CryoOrientError(f"training failed: {_root_error(exc)}") from None
    return export_trained_model(run, result.checkpoint, time.perf_counter() - t0)


def _train_summary(run: TrainRun, state: dict, seconds: float) -> dict:
    cfg, manifests, first = run.job.cfg, run.manifests, run.manifests[0]
    return {
        "cryoorient_ray": __version__,
        "stores": [str(s) for s in run.job.stores],
        "image_size": first.image_size,
        "pixel_size": first.pixel_size,
        "snr_db": [st.manifest.get("config", {}).get("noise", {}).get("snr_db") for st in manifests],
        "best_epoch": state["best"]["epoch"],
        "best_val_loss": state["best"]["val_loss"],
        "final": state["history"][-1],
        "epochs_run": len(state["history"]),
        "seconds": seconds,
        "workers": cfg.num_workers,
        "steps_per_worker": int(state.get("step", 0)),
        "use_gpu": cfg.use_gpu,
        "fresh_noise": None if run.settings is None else run.settings.corruption,
        "preprocess": None
        if run.settings is None or run.settings.preprocess is None
        else {k: v for k, v in run.settings.preprocess.items() if k != "gain"},
        "proteins_seen": sorted({p["name"] for st in manifests for p in st.proteins if not p.get("heldout")}),
        "proteins_heldout": sorted({p["name"] for st in manifests for p in st.proteins if p.get("heldout")}),
        "init_model": None if run.settings is None else run.settings.init_model,
    }


def export_trained_model(run: TrainRun, checkpoint, seconds: float) -> dict:
    """Write ``model.pt`` (best weights), ``history.json`` and ``train_summary.json`` of a finished run.

    ``checkpoint`` is the run's last Ray Train checkpoint (it holds the best weights so far).
    Returns the summary.
    """
    from cryoorient_ray.io.files import atomic_path, atomic_write_text

    if checkpoint is None:
        raise CryoOrientError("training ended without a checkpoint")
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    pre = None if run.settings is None else Preprocess.from_dict(run.settings.preprocess)
    best_model = SiameseDistance(run.spec, preprocess=pre)
    best_model.load_state_dict(state["best"]["state"] or state["model"])
    summary = _train_summary(run, state, seconds)
    with atomic_path(run.out / "model.pt") as tmp:
        save_distance_model(tmp, best_model, extra={"version": __version__, "training": summary})
    atomic_write_text(run.out / "history.json", json.dumps(state["history"], indent=2) + "\n")
    atomic_write_text(run.out / "train_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
