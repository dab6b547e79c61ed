"""Distances shipped with the package, usable without training (`--model pretrained`).

``general`` (``general_32px.pt``) is the general distance of docs/MODEL_CARD.md: trained on
atomic models of ``../shared/data/models`` and procedural pseudo-proteins, 32² working images at
6 Å/px (a 64² × 3 Å acquisition box Fourier-cropped), fresh noise at −15 to 0 dB (SNR per image
at the acquisition box). Its card lists the proteins held out of it and its measured accuracy on them.

A model is named ``pretrained`` (the default one) or ``pretrained:NAME``; anything else is a file path.
"""

from __future__ import annotations

from pathlib import Path

from cryoorient_ray.errors import CryoOrientError

PRETRAINED_MODELS = {"general": "general_32px.pt"}
DEFAULT_PRETRAINED = "general"
PRETRAINED_IMAGE_SIZE = 32  # the working box the shipped models were trained at (pixels)
HERE = Path(__file__).resolve().parent


def is_pretrained(name: str | None) -> bool:
    """Whether ``name`` asks for a shipped model (``pretrained`` or ``pretrained:NAME``)."""
    return isinstance(name, str) and (name == "pretrained" or name.startswith("pretrained:"))


def pretrained_model_path(name: str = "pretrained") -> Path:
    """The file of the shipped model ``name`` (``pretrained`` = :data:`DEFAULT_PRETRAINED`).

    Raises:
        CryoOrientError: an unknown name, or the file missing from this installation.
    """
    key = DEFAULT_PRETRAINED if name == "pretrained" else name.partition(":")[2]
    if key not in PRETRAINED_MODELS:
        raise CryoOrientError(
            f"unknown pretrained model {name!r} (shipped: {', '.join('pretrained:' + k for k in PRETRAINED_MODELS)})"
        )
    path = HERE / PRETRAINED_MODELS[key]
    if not path.is_file():
        raise CryoOrientError(f"the pretrained model file {path} is missing from this installation (reinstall)")
    return path


def resolve_model_path(model: str | None) -> str | None:
    """``model`` with ``pretrained``/``pretrained:NAME`` replaced by the shipped file's path."""
    return str(pretrained_model_path(model)) if is_pretrained(model) else model
