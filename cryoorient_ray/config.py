"""Run configuration: pydantic models loaded from ``configs/*.yaml``, with CLI overrides.

- Unknown keys are rejected (``extra="forbid"``) with the dotted key and a close match.
- CLI options and ``--set section.key=value`` override YAML values (values parsed as YAML).
- Every run writes the resolved config, stamped with the package version and command line,
  next to its outputs (:func:`write_stamped_config`); a stamped file loads back as a config.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import os
import platform
import shlex
import socket
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from cryoorient_ray import __version__
from cryoorient_ray.core.geometry.symmetry import normalize_symmetry_name
from cryoorient_ray.core.recovery.solver import RecoverySettings
from cryoorient_ray.core.refinement.global_search import GlobalRefineSettings
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.files import atomic_write_text

STAMPED_CONFIG_NAME = "config.yaml"


def _is_number_type(annotation: Any) -> bool:
    """Whether a field's type is a number (``int``, ``float``, optional or in a union), not ``bool``."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_number_type(a) for a in typing.get_args(annotation) if a is not bool)
    return False


class StrictModel(BaseModel):
    """Base model: unknown keys are errors; values are re-validated on assignment.

    Numbers must be finite (NaN and infinity are refused), and a boolean is not a number
    (``n_per_map: true`` is an error, not 1).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and _is_number_type(field.annotation):
            raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
        return value


class OrientationConfig(StrictModel):
    """How orientations are drawn (see :func:`cryoorient_ray.core.geometry.sampling.sample_orientations`)."""

    sampler: Literal["uniform", "euler"] = Field("uniform", description="uniform on SO(3), or uniform Euler angles")
    coverage: Literal["full", "half", "quarter"] = Field("full", description="part of the viewing sphere")
    symmetry: str = Field("C1", description="point group of the protein: C1, Cn, Dn, T, O, I")

    @field_validator("symmetry")
    @classmethod
    def _symmetry(cls, value: str) -> str:
        return normalize_symmetry_name(value)


class InputSpec(StrictModel):
    """One density source with its own settings (a plain string in ``inputs`` uses the defaults)."""

    source: str = Field(..., min_length=1, description="model/map file, folder, PDB/EMDB id, or pseudo[:SEED]")
    name: str | None = Field(None, description="name in the store (default: from the source)")
    symmetry: str | None = Field(None, description="point group (default: orientations.symmetry)")
    heldout: bool = Field(False, description="hold this protein out of training (tests generalisation)")
    n_per_map: int | None = Field(
        None, ge=1, description="projections of each map of this source (default: simulate.n_per_map)"
    )

    @field_validator("symmetry")
    @classmethod
    def _symmetry(cls, value: str | None) -> str | None:
        return None if value is None else normalize_symmetry_name(value)


class NoiseConfig(StrictModel):
    """Additive Gaussian noise; the paper's σ² = 16 against a signal variance ≈ 1 is about -12 dB.

    The SNR is per image, ``var(clean image over the acquisition box) / σ²`` (docs/CONVENTIONS.md,
    "Noise"), set at the acquisition box (:class:`AcquisitionConfig`); binning to a smaller working
    box raises it (by ``10·log10(L_acq² / L²)`` dB for white noise).
    """

    snr_db: float | None = Field(
        None,
        ge=-100,
        le=100,
        description="signal-to-noise ratio in dB per image, at the acquisition box; null = noiseless",
    )


class AcquisitionConfig(StrictModel):
    """Where the microscope sets the noise: the box and pixel size the images are simulated at.

    Maps are prepared, projections rendered and CTF and noise applied at ``image_size`` pixels of
    ``pixel_size`` Å; each image is then Fourier-cropped to ``simulate.image_size`` (the working
    box that training and recovery use). The field of view is the same at both boxes:
    ``pixel_size · image_size = simulate.voxel_size · simulate.image_size``. Null values mean the
    working box / pixel size (no cropping: the images are simulated where they are used). Give the
    working ``simulate.voxel_size`` or this ``pixel_size`` (or both, agreeing); maps made from
    atomic models default to a resolution of twice the acquisition pixel size.
    """

    image_size: int | None = Field(
        None, ge=8, le=2048, description="acquisition box L_acq (pixels), >= simulate.image_size; null = the same"
    )
    pixel_size: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="Å per pixel at acquisition; null = simulate.voxel_size · image_size / acquisition.image_size",
    )


class ShiftConfig(StrictModel):
    """Off-centring shifts S_t (sub-pixel, no wrap-around)."""

    max_shift: float = Field(0.0, ge=0, description="largest shift along x and y, in pixels")
    distribution: Literal["triangular", "uniform"] = "triangular"


class CTFConfig(StrictModel):
    """Contrast transfer function (RELION convention); off by default."""

    enabled: bool = False
    defocus_min: float = Field(5000.0, ge=0, description="Å")
    defocus_max: float = Field(25000.0, ge=0, description="Å")
    astigmatism_max: float = Field(500.0, ge=0, description="largest defocus_u - defocus_v, Å")
    voltage: float = Field(300.0, gt=0, description="kV")
    cs: float = Field(2.7, ge=0, description="spherical aberration, mm")
    amplitude_contrast: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _range(self) -> CTFConfig:
        if self.defocus_min > self.defocus_max:
            raise ValueError(f"defocus_min {self.defocus_min} is larger than defocus_max {self.defocus_max}")
        return self


class SplitConfig(StrictModel):
    """Fractions of each protein's projections in train/val/test (the paper's Table 1: 50/17/33 %)."""

    train: float = Field(0.50, ge=0, le=1)
    val: float = Field(0.17, ge=0, le=1)
    test: float = Field(0.33, ge=0, le=1)

    @model_validator(mode="after")
    def _sum(self) -> SplitConfig:
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {self.train + self.val + self.test:g}")
        return self

    def fractions(self) -> tuple[float, float, float]:
        return (self.train, self.val, self.test)


class SimulateConfig(StrictModel):
    """Projection simulation: density sources → projections in a sharded Zarr store."""

    inputs: list[str | InputSpec] = Field(
        default_factory=lambda: ["pseudo"], description="files, folders, PDB/EMDB ids or pseudo[:SEED]"
    )
    n_per_map: int = Field(1000, ge=1, description="projections per density map")
    image_size: int = Field(64, ge=8, le=1024, description="projection size L (pixels); maps are boxed to L³")
    voxel_size: float | None = Field(
        None,
        gt=0,
        description="Å per pixel of the stored (working) images; null = the map's own (3 Å for models), "
        "or acquisition.pixel_size · acquisition.image_size / image_size",
    )
    resolution: float | None = Field(None, gt=0, description="Å, for maps made from atomic models (default 2·voxel)")
    orientations: OrientationConfig = Field(default_factory=OrientationConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    acquisition: AcquisitionConfig = Field(default_factory=AcquisitionConfig)
    shifts: ShiftConfig = Field(default_factory=ShiftConfig)
    ctf: CTFConfig = Field(default_factory=CTFConfig)
    splits: SplitConfig = Field(default_factory=SplitConfig)
    shard_size: int = Field(256, ge=1, description="projections per shard (one Ray task writes one shard)")
    backend: Literal["auto", "torch", "real", "astra"] = Field("auto", description="projector; auto = ASTRA with CUDA")
    skip_failed_inputs: bool = Field(False, description="skip sources that fail to load instead of stopping")
    store: str | None = Field(None, description="output store (default: <output_dir>/projections.zarr)")

    @model_validator(mode="after")
    def _acquisition(self) -> SimulateConfig:
        acq, size = self.acquisition, self.image_size
        if acq.image_size is not None and acq.image_size < size:
            raise ValueError(
                f"acquisition.image_size {acq.image_size} is smaller than simulate.image_size {size}: "
                "the acquisition box must be at least the working box (images are Fourier-cropped to it)"
            )
        box = self.acquisition_size
        if acq.pixel_size is not None and self.voxel_size is not None:
            want = self.voxel_size * size / box
            if abs(acq.pixel_size - want) > 1e-3 * want:
                raise ValueError(
                    f"acquisition.pixel_size {acq.pixel_size:g} Å disagrees with "
                    f"simulate.voxel_size {self.voxel_size:g} Å: "
                    f"{box} px at acquisition over {size} px working needs {want:.6g} Å "
                    "(same field of view); set one of them"
                )
        if box > size and acq.pixel_size is None and self.voxel_size is None:
            raise ValueError(
                f"acquisition.image_size {box} > simulate.image_size {size} needs a pixel size: "
                "set simulate.voxel_size (working) or acquisition.pixel_size"
            )
        return self

    @property
    def acquisition_size(self) -> int:
        """The acquisition box ``L_acq`` (pixels): ``acquisition.image_size``, else ``image_size``."""
        return self.image_size if self.acquisition.image_size is None else self.acquisition.image_size

    @property
    def acquisition_unset(self) -> bool:
        """True when ``acquisition`` adds nothing to the working settings (both null, or the box equal
        to ``image_size`` and no pixel size): the images are simulated as before it existed."""
        return self.acquisition_size == self.image_size and self.acquisition.pixel_size is None

    def acquisition_pixel_size(self) -> float | None:
        """Å per pixel at acquisition (None: the maps' own voxel size, as ``voxel_size`` null)."""
        if self.voxel_size is not None and self.acquisition_size == self.image_size:
            return self.voxel_size
        if self.acquisition.pixel_size is not None:
            return self.acquisition.pixel_size
        if self.voxel_size is None:
            return None
        return self.voxel_size * self.image_size / self.acquisition_size

    def working_pixel_size(self, acquisition_pixel_size: float) -> float:
        """Å per working pixel for maps prepared at ``acquisition_pixel_size``: ``voxel_size`` when
        given, else ``acquisition_pixel_size · L_acq / L`` (the same field of view)."""
        if self.voxel_size is not None:
            return self.voxel_size
        if self.acquisition_size == self.image_size:
            return acquisition_pixel_size
        return acquisition_pixel_size * self.acquisition_size / self.image_size


class ModelConfig(StrictModel):
    """Siamese feature extractor and distance head (see cryoorient_ray.core.learning.model)."""

    channels: list[int] = Field(default_factory=lambda: [16, 32, 64, 128], description="width of each conv block")
    kernel_size: int = Field(3, ge=1, description="odd convolution kernel size")
    convs_per_block: int = Field(1, ge=1, le=4)
    norm: Literal["batch", "group", "none"] = "group"
    n_features: int = Field(64, ge=2, le=4096, description="n_f, the embedding size")
    head: Literal["angle", "paper", "so3"] = Field(
        "so3", description="angle in [0, π]; the paper's 2·acos; so3: arccos((3cos θ−1)/2), exact for SO(3)"
    )
    pool: Literal["global", "grid"] = Field(
        "grid", description="global: 1×1 conv + global average pool (paper); grid: grid×grid average pool + MLP"
    )
    grid: int = Field(4, ge=1, le=16, description="cells per side of the grid pool")
    hidden: int = Field(256, ge=1, description="hidden units of the grid pool's perceptron")

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {value}")
        return value


class AugmentConfig(StrictModel):
    """On-the-fly augmentation of training pairs (on top of what the store holds). Noise is
    ``train.noise`` (fresh noise at the acquisition SNR), not an augmentation."""

    max_shift: int = Field(0, ge=0, description="random integer shifts up to this many pixels (zero fill)")


class TrainNoiseConfig(StrictModel):
    """Fresh noise (and CTF) drawn on the store's clean projections for every training batch, with
    the simulator's statistics (core/imaging/corruption.py); validation and test images stay the
    store's fixed noisy ones."""

    fresh: bool | None = Field(
        None,
        description="draw new noise/CTF every batch on the clean projections; null = yes when the store holds "
        "clean projections and noise or a CTF (or when snr_db is given)",
    )
    snr_db: float | tuple[float, float] | None = Field(
        None,
        description="SNR in dB at the acquisition box (as simulate.noise.snr_db), or a range [lo, hi] drawn per "
        "image; null = the store's own",
    )
    curriculum_start_db: float | None = Field(
        None, description="start training at this (easier) SNR and move linearly to snr_db; null = no curriculum"
    )
    curriculum_fraction: float = Field(0.5, gt=0, le=1, description="fraction of the steps the curriculum spans")
    ctf: Literal["auto", "fresh", "store", "off"] = Field(
        "auto",
        description="fresh: a new defocus per image drawn from the store's ranges; off: no CTF; "
        "auto = fresh when the store's images have a CTF",
    )
    max_shift: float = Field(0.0, ge=0, description="extra fresh shifts uniform in ±max_shift working pixels")

    @field_validator("snr_db")
    @classmethod
    def _range(cls, value):
        if isinstance(value, tuple) and value[0] > value[1]:
            raise ValueError(f"the SNR range [{value[0]}, {value[1]}] has lo > hi")
        return value


class PreprocessConfig(StrictModel):
    """What every image goes through before the network, the same in training and recovery (saved in
    model.pt; core/imaging/preprocess.py)."""

    phase_flip: Literal["auto"] | bool = Field(
        "auto", description="flip by the sign of each image's CTF; auto = when the images have a CTF"
    )
    filter: Literal["wiener", "lowpass", "none"] = Field(
        "wiener",
        description="radial filter matched to the SNR: wiener S/(S+N) from the train store's clean spectrum and "
        "the known noise power; lowpass: cut where S < N; none",
    )
    ctf_correction: Literal["flip", "wiener"] = Field(
        "flip",
        description="how the CTF is corrected when phase_flip applies: flip = sign(CTF); wiener = CTF/(CTF² + N/S) "
        "per image, S the clean spectrum before the CTF (needs clean projections; replaces filter)",
    )


class TrainConfig(StrictModel):
    """Data-parallel training of the distance with Ray Train."""

    stores: list[str] = Field(default_factory=list, description="projection stores (default: the run's own)")
    epochs: int = Field(20, ge=1)
    pairing: Literal["batch", "stream"] = Field(
        "batch",
        description="batch: all pairs within each image batch, weighted uniform in d_q (B²/2 pairs per B images); "
        "stream: the paper's pre-drawn pairs from the Ray Data pair stream",
    )
    batch_size: int = Field(128, ge=2, description="images (batch) or pairs (stream) per step per worker")
    data: Literal["auto", "memory", "stream"] = Field(
        "auto",
        description="memory: each worker reads the train images once (a materialised Ray Dataset) and draws "
        "every pass's batches from memory in a seeded order, validation pairs too; stream: Ray Data streams "
        "the store every pass (for stores larger than memory; leave CPU beside the workers for its read tasks); "
        "auto: memory when the train images take at most memory_gb",
    )
    memory_gb: float = Field(
        2.0, gt=0, description="with data auto: the largest train split (GB of float32 images) held in memory"
    )
    pairs_per_shard: int | None = Field(None, ge=1, description="training pairs drawn per shard per epoch")
    val_pairs_per_shard: int | None = Field(None, ge=1)
    optimizer: Literal["adam", "rmsprop"] = "adam"
    lr: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="cosine: linear warm-up over 5% of the steps, then cosine decay to 1% of lr"
    )
    passes_per_epoch: int = Field(
        1, ge=1, description="passes over the train split per epoch (one checkpoint/validation per epoch)"
    )
    weight_decay: float = Field(0.0, ge=0)
    num_workers: int = Field(2, ge=1, description="Ray Train workers")
    use_gpu: bool = False
    cpus_per_worker: float = Field(
        0.5,
        gt=0,
        description="CPUs Ray reserves per worker; its torch threads are the whole CPUs of it (at least 1). "
        "With data stream keep it fractional, so Ray Data read tasks are not starved",
    )
    mixed_precision: bool = Field(True, description="bf16 autocast on CUDA")
    max_failures: int = Field(2, ge=0, description="restarts from the last checkpoint after a worker dies")
    storage_path: str | None = Field(
        None,
        description="where Ray Train keeps checkpoints (RunConfig.storage_path): a folder every node can reach "
        "or an s3:// / gs:// URL; needed for multi-node training; default: <run folder>/ray_train",
    )
    init_model: str | None = Field(
        None,
        description="fine-tune: a model.pt to start from (its architecture wins over train.model); a Ray Train "
        "checkpoint of the same run still wins (resume); the preprocessing is re-estimated from the new store",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    noise: TrainNoiseConfig = Field(default_factory=TrainNoiseConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)


class SearchConfig(StrictModel):
    """Hyper-parameter search of the distance with Ray Tune (``cryoorient tune``): one Ray Train run
    per trial, ASHA early stopping on the validation L_DE."""

    space: str = Field(
        "configs/tune_space.yaml", description="search space file: train.* settings as choice/loguniform/randint..."
    )
    num_samples: int = Field(16, ge=1, description="configurations drawn from the space (times each grid value)")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="trials at once; null = as many as the Ray resources fit"
    )
    metric: Literal["val_loss", "heldout_loss"] = Field(
        "val_loss", description="L_DE that ranks trials: validation pairs of seen or of held-out proteins"
    )
    grace_period: int = Field(2, ge=1, description="ASHA: epochs every trial runs before it may be stopped")
    reduction_factor: float = Field(3.0, gt=1, description="ASHA: the best 1/η of the trials go on at each rung")
    driver_cpus: float = Field(
        0.25, ge=0, description="CPUs of each trial's driver (the Tune actor that runs the trial's TorchTrainer)"
    )
    max_failures: int = Field(0, ge=0, description="Tune restarts of a trial whose driver died")


class GaugeConfig(StrictModel):
    """Picking the physical solution among the distance-equivalent ones, from the images."""

    enabled: bool = Field(True, description="resolve the left rotation/conjugation from the images")
    max_images: int = Field(1500, ge=50, description="images used by the gauge (in-plane angles, view-axis fit)")
    image_size: int = Field(32, ge=8, description="images are Fourier-cropped to at most this size first")
    search_images: int = Field(
        300, ge=20, description="images of the cross-validated reconstructions of the coarse in-plane grid"
    )
    search_size: int = Field(16, ge=8, description="the coarse grid's images are Fourier-cropped to this size")
    polish_images: int = Field(
        750, ge=20, description="images of the cross-validated reconstructions of the refinement and polish"
    )
    polish_size: int = Field(16, ge=8, description="the refinement's images are Fourier-cropped to this size")
    phi_margin: float = Field(
        0.01, ge=0, description="coarse peaks within this score of the best are all refined (close calls)"
    )
    threads: int = Field(
        1, ge=1, description="torch threads during the gauge (its small FFTs and scatters stall when threads wait)"
    )
    phi_steps: int = Field(24, ge=4, description="coarse grid of the global in-plane angle over [0, π)")
    polish_rounds: int = Field(3, ge=0, description="rounds of the final local search of the correction")


_SOLVER = RecoverySettings()  # the solver's defaults, written once (core/recovery/solver.py)


class SolverConfig(StrictModel):
    """The optimiser of the recovery: the keys of :class:`RecoverySettings`, with its defaults.

    :class:`RecoverConfig` inherits them, so they stay flat keys of the ``recover`` section
    (``recover.max_steps``, as in every existing config). :meth:`settings` is the one hand-off
    to the solver; the run's seed and the resolved device complete it.
    """

    init: Literal["gram", "random"] = Field(
        _SOLVER.init, description="gram: rank-9 Gram completion rounded to rotations; random: the paper's random start"
    )
    lr: float = Field(_SOLVER.lr, gt=0, description="Adam step size")
    lr_final: float = Field(_SOLVER.lr_final, gt=0, description="the L_OR step size decays to this at max_steps")
    init_steps: int = Field(
        _SOLVER.init_steps, ge=0, description="with init gram: steps of the Gram completion at most"
    )
    rounding_starts: int = Field(
        _SOLVER.rounding_starts, ge=1, description="with init gram: random starts of the rounding to rotations"
    )
    warmup_steps: int = Field(
        _SOLVER.warmup_steps, ge=0, description="with init random: steps of the smooth cosine loss"
    )
    max_steps: int = Field(_SOLVER.max_steps, ge=1, description="L_OR steps at most")
    min_steps: int = Field(_SOLVER.min_steps, ge=0, description="L_OR steps before the convergence test may stop")
    tol: float = Field(
        _SOLVER.tol, gt=0, description="stop when the loss improves less than this fraction over window steps"
    )
    window: int = Field(_SOLVER.window, ge=0, description="steps of the convergence test")
    restarts: int = Field(_SOLVER.restarts, ge=1, description="starts of the initialisation; the lowest L_OR goes on")
    chunk_size: int = Field(_SOLVER.chunk_size, ge=1, description="edges per pass of the gradient (bounds memory)")
    loss: Literal["l2", "huber", "cauchy"] = Field(
        _SOLVER.loss, description="L_OR's penalty of a residual d_q - d̂: l2 (the paper's) or a robust huber/cauchy"
    )
    loss_scale: float = Field(_SOLVER.loss_scale, gt=0, description="scale of the huber/cauchy loss, in radians")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="torch device of in-process recovery (auto: cuda when a GPU is visible)"
    )

    def settings(self, seed: int) -> RecoverySettings:
        """The solver's :class:`RecoverySettings` from these keys, with ``seed`` and ``device`` resolved."""
        import torch

        keys = set(SolverConfig.model_fields) - {"device"}
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        return RecoverySettings(**self.model_dump(include=keys), seed=seed, device=device)


class RecoverConfig(SolverConfig):
    """Orientation recovery on a sparse pair graph (optionally on Ray actors); the optimiser's keys
    are :class:`SolverConfig`'s."""

    estimator: Literal["model", "euclidean", "exact"] = Field(
        "model", description="model: the trained distance; euclidean: the baseline; exact: true d_q (experiments)"
    )
    model: str | None = Field(
        None,
        description="trained model file, or pretrained[:NAME] (a shipped general distance, docs/MODEL_CARD.md); "
        "set, `cryoorient run` trains nothing; null = the run's model.pt, else (none trained) pretrained",
    )
    perturb_sigma2: float = Field(0.0, ge=0, description="with exact: add Gaussian noise of this variance (rad²)")
    split: Literal["train", "val", "test"] = "test"
    protein: str | None = Field(None, description="protein name or index in the store (default: the first)")
    max_projections: int | None = Field(None, ge=3, description="recover a random subset of this many")
    k: int = Field(10, ge=0, description="nearest neighbours per projection in the pair graph")
    n_random: int = Field(20, ge=0, description="random long-range partners per projection")
    mutual_knn: bool = Field(False, description="keep a kNN edge only when each end is among the other's k nearest")
    n_random_unreliable: int = Field(
        0, ge=0, description="extra random partners per projection, times the share of its kNN that are not mutual"
    )
    weights: Literal["none", "confidence"] = Field(
        "none", description="edge weights: none, or confidence 1/σ²(d̂) from the model's calibration (model only)"
    )
    symmetric_start: Literal["auto", "anchors", "spectral"] = Field(
        "auto",
        description="start of the recovery on SO(3)/G (a protein with a point group): auto: for D2 both the "
        "spectral start (every pair's d̂ of up to 2,000 projections) and the anchor start, the one that fits the "
        "graph's d̂ better is kept; other groups: the anchor start; anchors or spectral (D2 only): that one alone",
    )
    actors: int = Field(0, ge=0, description="Ray actors holding edge partitions (0 = in-process)")
    cpus_per_actor: float = Field(1.0, gt=0)
    gauge: GaugeConfig = Field(default_factory=GaugeConfig)


class ReconstructConfig(StrictModel):
    """Volume from the projections and recovered orientations; FSC; optional refinement."""

    method: Literal["auto", "fourier", "cg", "astra"] = Field(
        "auto", description="auto: ASTRA CGLS on a GPU when installed, else Fourier inversion (CPU/GPU)"
    )
    wiener: float | None = Field(None, gt=0, description="Wiener constant; null = from the simulated SNR")
    mask_radius: float | None = Field(None, gt=0, description="soft spherical mask radius in voxels")
    refine_rounds: int = Field(0, ge=0, description="rounds of projection-matching refinement (0 = none)")


_GLOBAL = GlobalRefineSettings()  # the global search's defaults, written once (core/refinement/global_search.py)


class RefineConfig(StrictModel):
    """Global refinement by projection matching (the ``refine`` stage, `cryoorient refine`).

    The algorithm's keys are :class:`~cryoorient_ray.core.refinement.global_search.GlobalRefineSettings`'
    with its defaults (:meth:`settings` is the one hand-off); the others say where it starts, on
    which projections, and where it runs.
    """

    enabled: bool = Field(False, description="run the refine stage in `cryoorient run` (after recover)")
    start: Literal["recovered", "star", "random"] = Field(
        "recovered",
        description="recovered: the recover stage's orientations; star: a RELION .star (start_file); "
        "random: random orientations (the control: ab initio from nothing)",
    )
    start_file: str | None = Field(
        None,
        description="with start recovered: a run folder or its recovered_orientations.npz (null: the run's own); "
        "with start star: the .star file (its particles matched to the store's by their images)",
    )
    split: Literal["train", "val", "test"] = Field("test", description="with start random or star: the split")
    protein: str | None = Field(
        None, description="with start random or star: protein name or index in the store (default: the first)"
    )
    max_projections: int | None = Field(None, ge=3, description="with start random: a random subset of this many")
    iterations: int = Field(
        _GLOBAL.iterations, ge=1, le=1000, description="iterations of search + reconstruction at most"
    )
    start_deg: float = Field(_GLOBAL.start_deg, gt=0, le=90, description="angular step of the coarsest SO(3) grid (°)")
    final_deg: float = Field(
        _GLOBAL.final_deg,
        gt=0,
        le=90,
        description="the search refines to the first grid level with a step <= this (°)",
    )
    keep: int = Field(
        _GLOBAL.keep,
        ge=1,
        description="candidates kept per image at every level of the search (8 children each at the next)",
    )
    max_shift_px: float = Field(
        _GLOBAL.max_shift_px,
        ge=0,
        description="radius of the shift search (pixels); 0 = the store's shifts as they are",
    )
    shift_step_px: float = Field(
        _GLOBAL.shift_step_px,
        gt=0,
        description="the shift grid's step at the coarsest level is twice this, halved per level (pixels)",
    )
    mode: Literal["hard", "soft"] = Field(
        _GLOBAL.mode, description="hard: each image at its best candidate; soft: weighted by the posterior"
    )
    wiener: float | None = Field(None, gt=0, description="Wiener constant; null = from the simulated SNR")
    mask_radius: float | None = Field(
        _GLOBAL.mask_radius, gt=0, description="soft spherical mask radius in voxels; null = L/2 − 4"
    )
    start_resolution_A: float | None = Field(
        _GLOBAL.start_resolution_A,
        gt=0,
        description="first band limit (Å); null = a quarter of Nyquist from random, else the start map's FSC0.143",
    )
    patience: int = Field(
        _GLOBAL.patience, ge=1, description="iterations without a half-map FSC improvement before it stops"
    )
    local_polish_rounds: int = Field(
        _GLOBAL.local_polish_rounds, ge=0, description="rounds of the local refiner on each half at the end"
    )
    batch_size: int = Field(_GLOBAL.batch_size, ge=1, description="images per scoring batch (bounds memory)")
    symmetry_mode: Literal["impose", "c1_then_symmetrise"] = Field(
        _GLOBAL.symmetry_mode,
        description="protein with a point group: impose = search its asymmetric unit, maps with the group "
        "imposed; c1_then_symmetrise = search and maps in C1, the final maps symmetrised (RELION's advice)",
    )
    ab_initio: Literal["auto", "on", "off"] = Field(
        _GLOBAL.ab_initio,
        description="start from the stochastic ab initio map: on, off, or auto (from random orientations; from a "
        "given start whose half maps' FSC area is less than 0.75 of the way from random orientations' area to the "
        "shell count, when the ab initio poses' area is larger)",
    )
    ab_initio_steps: int = Field(_GLOBAL.ab_initio_steps, ge=1, description="minibatch steps of the ab initio phase")
    ab_initio_batch_size: int = Field(_GLOBAL.ab_initio_batch_size, ge=2, description="images per ab initio step")
    actors: int = Field(0, ge=0, description="Ray actors scoring image batches (0 = in-process)")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpu: bool | None = Field(None, description="score on a GPU (null = when CUDA is present)")

    @model_validator(mode="after")
    def _schedule(self) -> RefineConfig:
        if self.final_deg > self.start_deg:
            raise ValueError(f"final_deg {self.final_deg:g} is larger than start_deg {self.start_deg:g}")
        return self

    def device(self) -> str:
        """The torch device of the search: ``gpu`` true → cuda, false → cpu, null → cuda when present.

        Raises:
            CryoOrientError: ``gpu`` true on a machine without CUDA.
        """
        import torch

        if self.gpu is None:
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.gpu and not torch.cuda.is_available():
            raise CryoOrientError("refine.gpu is true (--gpu) but torch sees no CUDA device here")
        return "cuda" if self.gpu else "cpu"

    def settings(self, seed: int, symmetry: str, wiener: float) -> GlobalRefineSettings:
        """The search's :class:`GlobalRefineSettings` from these keys, with the run's ``seed``, the
        protein's ``symmetry``, the ``wiener`` constant (``refine.wiener``, or the store's: see
        :func:`~cryoorient_ray.stages.reconstruct.wiener_constant`) and the device (:meth:`device`)."""
        keys = {f.name for f in dataclasses.fields(GlobalRefineSettings)} - {"seed", "symmetry", "device", "wiener"}
        return GlobalRefineSettings(
            **self.model_dump(include=keys),
            wiener=float(wiener),
            seed=seed,
            device=self.device(),
            symmetry=symmetry,
        )


class BootstrapConfig(StrictModel):
    """Bootstrap from the data (``cryoorient run ... --bootstrap N``; stages/bootstrap.py): each round
    projects the current map (low-passed to its half-map FSC0.143) with the data store's box, pixel
    size, SNR, CTF and shifts, fine-tunes the current distance on those projections
    (``train.init_model``), recovers the data's orientations with it, refines and reconstructs."""

    rounds: int = Field(0, ge=0, description="bootstrap rounds after the pipeline (0 = none)")
    map: Literal["auto", "refined", "reconstruct"] = Field(
        "auto",
        description="the map round 1 projects: refined (the refine stage's map.mrc), reconstruct (the "
        "reconstruct stage's reconstruction.mrc), auto = refined when the refine stage runs; later rounds "
        "project the previous round's refined map",
    )
    n_images: int | None = Field(
        None, ge=10, description="projections simulated per round; null = the data protein's count"
    )
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of them that validates the fine-tune")
    epochs: int = Field(2, ge=1, description="fine-tune epochs per round (train.* gives the rest)")
    passes_per_epoch: int = Field(2, ge=1, description="passes over the simulated train images per epoch")
    lr: float | None = Field(None, gt=0, description="fine-tune learning rate; null = train.lr / 3")


class RayConfig(StrictModel):
    """Where stages run: local Ray (address null) or an existing cluster (see clusters/ and docs/SCALING.md).

    On a cluster the stages take their resources from the other sections, unchanged:
    ``train.num_workers``/``use_gpu``/``cpus_per_worker``, ``recover.actors``/``cpus_per_actor``,
    one CPU per ``simulate`` shard task. ``num_cpus``/``num_gpus`` only size a local Ray.
    """

    address: str | None = Field(
        None,
        description="Ray address: host:6379 of a running head, 'auto' (a `ray start` cluster on this machine) "
        "or 'ray://host:10001'; null = the RAY_ADDRESS environment variable, else a local Ray",
    )
    connect_timeout: float = Field(5.0, gt=0, description="seconds to wait for the address to answer")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs for a local Ray (null = all)")
    num_gpus: int | None = Field(None, ge=0, description="GPUs for a local Ray (null = all)")
    log_to_driver: bool = Field(False, description="show Ray workers' logs (also on with --verbose)")


class Stamp(StrictModel):
    """Provenance written into every resolved config."""

    version: str
    command: str
    created: str
    host: str
    python: str


class RunConfig(StrictModel):
    """A whole run: the root of every ``configs/*.yaml``."""

    name: str = Field("run", min_length=1, description="name of the run")
    seed: int = Field(0, ge=0, description="seed for every random draw")
    output_dir: Path = Field(Path("runs/run"), description="folder the run writes to")
    simulate: SimulateConfig = Field(default_factory=SimulateConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: SearchConfig = Field(default_factory=SearchConfig)
    recover: RecoverConfig = Field(default_factory=RecoverConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    reconstruct: ReconstructConfig = Field(default_factory=ReconstructConfig)
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    stamp: Stamp | None = Field(None, description="filled in when the config is written next to outputs")


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (sub)model at ``loc`` (for 'did you mean' hints)."""
    current: Any = model
    for part in loc[:-1]:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
    return list(getattr(current, "model_fields", {}))


def format_validation_error(exc: ValidationError, source: str, model: type[BaseModel] = RunConfig) -> str:
    """One line naming every bad key of a config, e.g. ``demo.yaml: unknown key 'simulate.n'``."""
    parts = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        dotted = ".".join(loc)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            close = difflib.get_close_matches(loc[-1], allowed, n=1)
            hint = (
                f" (did you mean '{close[0]}'?)" if close else (f" (allowed: {', '.join(allowed)})" if allowed else "")
            )
            parts.append(f"unknown key '{dotted}'{hint}")
        else:
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            parts.append(f"'{dotted}': {msg}")
    return f"{source}: " + "; ".join(parts)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value as YAML) into ``(["section", "key"], value)``."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise CryoOrientError(f"override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise CryoOrientError(f"override {text!r}: value is not valid YAML ({exc.problem})") from exc
    return key.split("."), value


def apply_overrides(data: dict, overrides: dict[str, Any] | list[str] | None) -> dict:
    """Set dotted keys in a nested dict (a copy): from ``--set`` strings or a ``{dotted: value}`` map.

    ``None`` values in a mapping are skipped, so unset CLI options leave the YAML value alone.
    """
    out = _deepcopy(data)
    if not overrides:
        return out
    items = (
        [parse_override(o) for o in overrides]
        if isinstance(overrides, list)
        else [(k.split("."), v) for k, v in overrides.items() if v is not None]
    )
    for path, value in items:
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise CryoOrientError(f"cannot set '{'.'.join(path)}': '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def read_yaml_mapping(path: str | os.PathLike) -> dict:
    """Read a YAML file that must hold a mapping; every failure is one clear :class:`CryoOrientError`."""
    p = Path(path)
    if not p.exists():
        raise CryoOrientError(f"config file not found: {p}")
    if not p.is_file():
        raise CryoOrientError(f"config path is not a file: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CryoOrientError(f"{p}: not a text file ({exc.reason})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise CryoOrientError(f"{p}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CryoOrientError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(
    path: str | os.PathLike | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    sets: list[str] | None = None,
) -> RunConfig:
    """Load and validate a run config.

    Args:
        path: a YAML file, or None for the defaults.
        overrides: ``{dotted.key: value}`` from typed CLI options (None values ignored).
        sets: ``["section.key=value", ...]`` from ``--set``; applied last.

    Raises:
        CryoOrientError: missing/unreadable file, invalid YAML, unknown key or invalid value.
    """
    source = str(path) if path is not None else "config"
    data = read_yaml_mapping(path) if path is not None else {}
    data = apply_overrides(apply_overrides(data, overrides), sets)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise CryoOrientError(format_validation_error(exc, source)) from None


def make_stamp(argv: list[str] | None = None) -> Stamp:
    """Provenance for a run: version, command line, time, host, Python."""
    args = list(sys.argv if argv is None else argv)
    if args:
        args[0] = Path(args[0]).name
    return Stamp(
        version=__version__,
        command=shlex.join(args),
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        host=socket.gethostname(),
        python=platform.python_version(),
    )


def dump_config(cfg: RunConfig) -> str:
    """The config as YAML text (the same form :func:`load_config` reads)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def write_stamped_config(cfg: RunConfig, out_dir: str | os.PathLike, argv: list[str] | None = None) -> Path:
    """Write ``out_dir/config.yaml``: the resolved config plus its stamp. Returns the path."""
    stamped = cfg.model_copy(update={"stamp": make_stamp(argv)})
    header = f"# Resolved config written by cryoorient_ray {__version__}; load it with `cryoorient run <this file>`.\n"
    return atomic_write_text(Path(out_dir) / STAMPED_CONFIG_NAME, header + dump_config(stamped))


# ----------------------------------------------------------------------------- option combinations


def recover_estimator(
    model: str | os.PathLike | None, euclidean: bool = False, exact: bool = False, perturb: float | None = None
) -> Literal["model", "euclidean", "exact"] | None:
    """The ``recover.estimator`` that ``cryoorient recover``'s distance options ask for (None: the config's).

    ``model`` (a model file), ``euclidean`` and ``exact`` exclude each other; ``perturb`` (σ², rad²)
    means the exact distances plus noise, so it goes alone or with ``exact``.

    Raises:
        CryoOrientError: more than one estimator, e.g. ``choose one distance estimator; got --model and --exact``.
    """
    chosen = [
        name for name, on in (("--euclidean", euclidean), ("--exact", exact), ("--perturb", perturb is not None)) if on
    ]
    if model is not None:
        chosen.insert(0, "--model")
    if len(chosen) > 1 and chosen != ["--exact", "--perturb"]:
        raise CryoOrientError(f"choose one distance estimator; got {' and '.join(chosen)}")
    if euclidean:
        return "euclidean"
    if exact or perturb is not None:
        return "exact"
    return "model" if model else None


def refine_start(start: str) -> tuple[Literal["recovered", "star", "random"], str | None]:
    """``(refine.start, refine.start_file)`` of `cryoorient refine`'s START: ``random``, a ``.star``
    file, or a run folder / ``.npz`` of recovered orientations (checked when the stage opens it)."""
    text = str(start).strip()
    if not text:
        raise CryoOrientError("START is empty: give a run folder, a .star file or 'random'")
    if text.lower() == "random":
        return "random", None
    if text.lower().endswith(".star"):
        return "star", text
    return "recovered", text


def check_tune_resume(options: dict[str, Any]) -> None:
    """A resumed search runs from the experiment's own config and space: each of ``options``
    (``{"--config": value, ...}``) must be unset (None or empty).

    Raises:
        CryoOrientError: naming the options to drop.
    """
    given = [name for name, value in options.items() if value]
    if given:
        raise CryoOrientError(f"--resume uses the experiment's own config and space; drop {', '.join(given)}")
