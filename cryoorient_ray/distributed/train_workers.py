"""Data-parallel training of the Siamese distance with Ray Train (TorchTrainer, Train V2 API).

Driver (:func:`train_distance`): builds the Ray Data pair streams (train pairs of proteins seen
in training, fresh pairs each epoch; fixed validation pairs of seen proteins; validation pairs of
held-out proteins when the stores have some), starts ``num_workers`` workers, and after the run
exports the best weights as one file (``model.pt``) that later stages load without Ray.

Worker (:func:`train_loop_per_worker`): ``L_DE = mean |d̂ − d_q|²`` with Adam or RMSprop on its
shard of the pair stream, metrics summed over workers, a checkpoint every epoch (model,
optimiser, epoch, history, best weights so far). When a worker dies, Ray Train restarts the
group (``FailureConfig(max_failures)``) and the loop resumes from the latest checkpoint.
Rank 0 writes TensorBoard scalars.

:func:`build_trainer` and :func:`export_trained_model` are the two halves of
:func:`train_distance`; each Ray Tune trial (:mod:`cryoorient_ray.distributed.tune_trials`) uses them too,
so a trial trains exactly as ``cryoorient train`` does.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cryoorient_ray import __version__
from cryoorient_ray.config import TrainConfig
from cryoorient_ray.core.learning.model import SiameseDistance, SiameseSpec, save_distance_model
from cryoorient_ray.distributed.data import pair_dataset, sample_dataset
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.store import ProjectionStore

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "state.pt"


def _augment(images: torch.Tensor, aug: dict, generator: torch.Generator) -> torch.Tensor:
    if aug.get("max_shift"):
        m = int(aug["max_shift"])
        b, n = images.shape[0], images.shape[-1]
        padded = torch.nn.functional.pad(images, (m, m, m, m))
        dx = torch.randint(-m, m + 1, (b,), generator=generator)
        dy = torch.randint(-m, m + 1, (b,), generator=generator)
        images = torch.stack([padded[k, m - dy[k] : m - dy[k] + n, m - dx[k] : m - dx[k] + n] for k in range(b)])
    if aug.get("snr_db"):
        lo, hi = aug["snr_db"]
        snr = torch.empty(images.shape[0]).uniform_(lo, hi, generator=generator)
        var = images.var(dim=(-2, -1)) / 10 ** (snr / 10)
        noise = torch.randn(images.shape, generator=generator)
        images = images + noise * var.sqrt()[:, None, None]
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


def _evaluate(model, shard, batch_size: int, device) -> tuple[float, float, int]:
    """(L_DE, mean |error|, pairs) over this worker's shard, summed over all workers."""
    model.eval()
    sq = ab = n = 0.0
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
            pred = model(batch["image_i"].float(), batch["image_j"].float())
            err = pred - batch["distance"].float()
            sq += float((err * err).sum())
            ab += float(err.abs().sum())
            n += len(err)
    sq, ab, n = _all_reduce([sq, ab, n])
    return (sq / n if n else float("nan")), (ab / n if n else float("nan")), int(n)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker (see the module docstring)."""
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    device = ray.train.torch.get_device()
    spec = SiameseSpec(**config["model"])
    model = SiameseDistance(spec)
    if config["optimizer"] == "rmsprop":
        opt = torch.optim.RMSprop(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    else:
        opt = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    start_epoch, history, best = 0, [], {"val_loss": float("inf"), "epoch": -1, "state": None}
    step = 0
    resumed_from = -1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, history, best = state["epoch"] + 1, state["history"], state["best"]
        step = int(state.get("step", 0))
        resumed_from = state["epoch"]
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    use_amp = bool(config.get("mixed_precision")) and device.type == "cuda"
    writer = None
    if rank == 0 and config.get("tensorboard_dir"):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(config["tensorboard_dir"])
    fault = config.get("fault_injection") or {}
    initial_val = None
    if start_epoch == 0:  # the untrained model's validation L_DE: the start of the learning curve
        initial_val = _evaluate(model, ray.train.get_dataset_shard("val"), config["batch_size"], device)[0]
    generator = torch.Generator().manual_seed(int(config.get("seed", 0)) * 7919 + rank)

    for epoch in range(start_epoch, config["epochs"]):
        if fault and rank == fault.get("rank", 0) and epoch == fault["epoch"] and not Path(fault["marker"]).exists():
            # testing hook: a worker dies mid-training. Wait first so that Ray Train's controller has
            # collected the previous epoch's report (it polls workers): a report still queued in a
            # dying worker is lost, and the restart would find no checkpoint.
            time.sleep(float(fault.get("delay_s", 6.0)))
            Path(fault["marker"]).write_text(f"killed at epoch {epoch}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.perf_counter()
        model.train()
        sq = n = 0.0
        shard = ray.train.get_dataset_shard("train")
        batches = (
            batch
            for _ in range(int(config.get("passes_per_epoch", 1)))
            for batch in shard.iter_torch_batches(batch_size=config["batch_size"], device=device)
        )
        for batch in batches:
            if config["pairing"] == "batch":
                x = batch["images"].float()
                if config.get("augment"):
                    x = _augment(x, config["augment"], generator)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    emb = model(x)  # one argument: embeddings, through DDP so gradients are synchronised
                groups = batch["store_id"].long() * 100_000 + batch["protein"].long()
                loss, pairs = batch_pair_loss(
                    emb.float(), batch["quaternion"].cpu(), groups.cpu(), config["symmetry"], core.distance
                )
            else:
                xi, xj = batch["image_i"].float(), batch["image_j"].float()
                if config.get("augment"):
                    xi, xj = _augment(xi, config["augment"], generator), _augment(xj, config["augment"], generator)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    pred = model(xi, xj)
                loss = torch.mean((pred.float() - batch["distance"].float()) ** 2)
                pairs = len(pred)
            factor = lr_factor(step, int(config.get("total_steps", 0)), config.get("lr_schedule", "constant"))
            for group in opt.param_groups:
                group["lr"] = config["lr"] * factor
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sq += float(loss.detach()) * pairs
            n += pairs
        sq, n = _all_reduce([sq, n])
        metrics = {
            "epoch": epoch,
            "train_loss": sq / n if n else float("nan"),
            "train_pairs": int(n),
            "seconds": time.perf_counter() - t0,
            "steps": step,
            "lr": opt.param_groups[0]["lr"],
            "pairs_per_second_per_worker": n / max(1e-9, time.perf_counter() - t0) / ctx.get_world_size(),
            "resumed_from_epoch": resumed_from,
        }
        if initial_val is not None and epoch == 0:
            metrics["initial_val_loss"] = initial_val
        metrics["val_loss"], metrics["val_mae"], metrics["val_pairs"] = _evaluate(
            model, ray.train.get_dataset_shard("val"), config["batch_size"], device
        )
        if config.get("has_heldout"):
            metrics["heldout_loss"], metrics["heldout_mae"], metrics["heldout_pairs"] = _evaluate(
                model, ray.train.get_dataset_shard("heldout"), config["batch_size"], device
            )
        history.append(metrics)
        if metrics["val_loss"] < best["val_loss"]:
            state_cpu = {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}
            best = {"val_loss": metrics["val_loss"], "epoch": epoch, "state": state_cpu}
        if rank == 0 and config.get("progress_file"):
            with open(config["progress_file"], "a", encoding="utf-8") as fh:
                fh.write(json.dumps(metrics) + "\n")
        if writer is not None:
            for key in ("train_loss", "val_loss", "val_mae", "heldout_loss", "heldout_mae"):
                if key in metrics:
                    writer.add_scalar(f"L_DE/{key}" if "loss" in key else f"MAE/{key}", metrics[key], epoch)
            writer.flush()
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save(
                    {
                        "model": core.state_dict(),
                        "optimizer": opt.state_dict(),
                        "epoch": epoch,
                        "step": step,
                        "history": history,
                        "best": best,
                        "spec": spec.to_dict(),
                    },
                    Path(tmp) / CHECKPOINT_FILE,
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
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


@dataclass
class TrainRun:
    """A Ray Train run ready to fit: the trainer and what exporting its result needs."""

    trainer: TorchTrainer
    spec: SiameseSpec
    stores: list[str]
    manifests: list[ProjectionStore]
    out: Path


def build_trainer(
    cfg: TrainConfig,
    stores: list[str],
    out_dir: str | os.PathLike,
    seed: int = 0,
    name: str = "train",
    fault_injection: dict | None = None,
    callbacks: list | None = None,
) -> TrainRun:
    """Check the stores and build the ``TorchTrainer`` that trains the distance on them.

    Shared by :func:`train_distance` and each Ray Tune trial (:mod:`cryoorient_ray.distributed.tune_trials`),
    so both train the same way. ``out_dir`` receives the TensorBoard logs, the progress file and
    the Ray Train checkpoints (``ray_train/<name>``: a run restarted with the same ``out_dir`` and
    ``name`` resumes from its last checkpoint). ``callbacks`` are Ray Train callbacks (e.g. Tune's
    ``TuneReportCallback``, which forwards every epoch's metrics to the trial).
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not stores:
        raise CryoOrientError("no projection store to train on")
    spec = SiameseSpec(**cfg.model.model_dump())
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
    has_heldout = any(p.get("heldout") for st in manifests for p in st.proteins)
    if cfg.pairing == "batch":
        train_ds = sample_dataset(stores, "train", proteins="seen", shuffle=True)
    else:
        train_ds = pair_dataset(stores, "train", proteins="seen", pairs_per_shard=cfg.pairs_per_shard, seed=None)
    symmetry = {
        sid * 100_000 + k: p.get("symmetry", "C1")
        for sid, st in enumerate(manifests)
        for k, p in enumerate(st.proteins)
    }
    # validation pairs are fixed (seeded): draw them once, not again every epoch
    datasets = {
        "train": train_ds,
        "val": pair_dataset(
            stores, "val", proteins="seen", pairs_per_shard=cfg.val_pairs_per_shard, seed=seed + 1
        ).materialize(),
    }
    if has_heldout:
        datasets["heldout"] = pair_dataset(
            stores, "val", proteins="heldout", pairs_per_shard=cfg.val_pairs_per_shard, seed=seed + 2
        ).materialize()
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    # optimiser steps per worker, for the learning-rate schedule (an estimate: the stream is split
    # across workers by blocks, and stream pairing draws pairs_per_shard pairs per shard)
    n_rows = 0
    for st in manifests:
        rows = st.select_rows(split="train", proteins="seen")
        if cfg.pairing == "stream" and cfg.pairs_per_shard:
            n_rows += cfg.pairs_per_shard * len(np.unique(rows // st.shard_size))
        else:
            n_rows += len(rows)
    steps_per_epoch = max(1, int(np.ceil(n_rows / (cfg.batch_size * cfg.num_workers)))) * cfg.passes_per_epoch
    loop_config = {
        "model": spec.to_dict(),
        "lr_schedule": cfg.lr_schedule,
        "passes_per_epoch": cfg.passes_per_epoch,
        "total_steps": steps_per_epoch * cfg.epochs,
        "epochs": cfg.epochs,
        "pairing": cfg.pairing,
        "symmetry": symmetry,
        "batch_size": cfg.batch_size,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "mixed_precision": cfg.mixed_precision,
        "augment": cfg.augment.model_dump() if (cfg.augment.snr_db or cfg.augment.max_shift) else None,
        "has_heldout": has_heldout,
        "tensorboard_dir": str(out / "tensorboard"),
        "threads": max(1, int(round(cfg.cpus_per_worker))) if not cfg.use_gpu else 2,
        "seed": seed,
        "fault_injection": fault_injection,
        "progress_file": str(out / "progress.jsonl"),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        datasets=datasets,
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(out / "ray_train"),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
        ),
    )
    return TrainRun(trainer, spec, list(stores), manifests, out)


def train_distance(
    cfg: TrainConfig,
    stores: list[str],
    out_dir: str | os.PathLike,
    seed: int = 0,
    name: str = "train",
    fault_injection: dict | None = None,
    progress: bool = True,
) -> dict:
    """Train on ``stores`` and write ``model.pt``, ``history.json`` and TensorBoard logs into ``out_dir``.

    Ray must be initialised. ``fault_injection`` (tests only) kills a worker once:
    ``{"epoch": e, "marker": path}``. Returns the summary written to ``train_summary.json``.
    """
    run = build_trainer(cfg, stores, out_dir, seed=seed, name=name, fault_injection=fault_injection)
    out, trainer = run.out, run.trainer
    t0 = time.perf_counter()
    (out / "progress.jsonl").unlink(missing_ok=True)
    try:
        result = _fit_with_progress(trainer, out / "progress.jsonl", cfg.epochs, progress)
    except Exception as exc:
        raise CryoOrientError(f"training failed: {_root_error(exc)}") from None
    return export_trained_model(run, result.checkpoint, cfg, time.perf_counter() - t0)


def export_trained_model(run: TrainRun, checkpoint, cfg: TrainConfig, seconds: float) -> dict:
    """Write ``model.pt`` (best weights), ``history.json`` and ``train_summary.json`` of a finished run.

    ``checkpoint`` is the run's last Ray Train checkpoint (it holds the best weights so far).
    Returns the summary.
    """
    out, spec, manifests, stores = run.out, run.spec, run.manifests, run.stores
    if checkpoint is None:
        raise CryoOrientError("training ended without a checkpoint")
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    best_model = SiameseDistance(spec)
    best_model.load_state_dict(state["best"]["state"] or state["model"])
    first = manifests[0]
    summary = {
        "cryoorient_ray": __version__,
        "stores": [str(s) for s in stores],
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
        "proteins_seen": sorted({p["name"] for st in manifests for p in st.proteins if not p.get("heldout")}),
        "proteins_heldout": sorted({p["name"] for st in manifests for p in st.proteins if p.get("heldout")}),
    }
    from cryoorient_ray.io.files import atomic_path, atomic_write_text

    with atomic_path(out / "model.pt") as tmp:
        save_distance_model(tmp, best_model, extra={"version": __version__, "training": summary})
    atomic_write_text(out / "history.json", json.dumps(state["history"], indent=2) + "\n")
    atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
