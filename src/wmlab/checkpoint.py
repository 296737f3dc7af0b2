"""Checkpoints that survive a kill at any moment and load without unpickling code.

A checkpoint is a set of files in one folder (local or any fsspec URL):

- ``<name>-<step>.safetensors``: model weights (and any other plain tensors),
- ``<name>-<step>.state.pt``: optimiser state and RNG states, read with ``weights_only=True``,
- ``<name>.json``: the sidecar naming those files plus step, data position and shapes.

The sidecar is written last, atomically, so it always names complete files: a kill before
it leaves the previous checkpoint in force (the orphaned newer files are removed on the next
save). Loading checks the recorded shapes against the model being built and refuses a
checkpoint of another shape with a message instead of a size-mismatch traceback.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from wmlab.errors import WmlabError
from wmlab.fsio import atomic_write_bytes


@dataclass
class Checkpoint:
    weights: dict[str, torch.Tensor]
    state: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def _fs(url: str) -> tuple[Any, str]:
    return fsspec.core.url_to_fs(url)


def save_checkpoint(folder: str, name: str, step: int, weights: dict[str, torch.Tensor],
                    state: dict[str, Any] | None = None, info: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """Write weights, optimiser/RNG state and the sidecar; then drop older files of ``name``.

    Returns the sidecar, whose ``fingerprint`` (a hash of the weights) names what later
    stages were computed from.
    """
    folder = folder.rstrip("/")
    weights_file = f"{name}-{step}.safetensors"
    state_file = f"{name}-{step}.state.pt" if state is not None else None
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    blob = save_safetensors(tensors)
    atomic_write_bytes(f"{folder}/{weights_file}", blob)
    if state is not None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(f"{folder}/{state_file}", buffer.getvalue())
    sidecar = {**(info or {}), "step": step, "weights": weights_file, "state": state_file,
               "fingerprint": hashlib.sha256(blob).hexdigest()[:16]}
    atomic_write_bytes(f"{folder}/{name}.json", json.dumps(sidecar, indent=2).encode())
    _remove_stale(folder, name, keep={weights_file, state_file})
    return sidecar


def _remove_stale(folder: str, name: str, keep: set[str | None]) -> None:
    fs, path = _fs(folder)
    for entry in fs.ls(path, detail=False):
        base = entry.rsplit("/", 1)[-1]
        stale = base.startswith(f"{name}-") and base not in keep and (
            base.endswith(".safetensors") or base.endswith(".state.pt") or ".tmp-" in base)
        if stale:
            fs.rm(entry)


def checkpoint_exists(folder: str, name: str) -> bool:
    fs, path = _fs(folder.rstrip("/"))
    return fs.exists(f"{path}/{name}.json")


def read_info(folder: str, name: str) -> dict[str, Any]:
    fs, path = _fs(folder.rstrip("/"))
    try:
        with fs.open(f"{path}/{name}.json", "rb") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise WmlabError(f"no checkpoint '{name}' in {folder}: train that stage first") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise WmlabError(f"checkpoint sidecar {folder}/{name}.json is corrupt: delete it to "
                         "start that stage again") from None


def load_checkpoint(folder: str, name: str, with_state: bool = True,
                    map_location: str | torch.device = "cpu") -> Checkpoint:
    info = read_info(folder, name)
    fs, path = _fs(folder.rstrip("/"))
    try:
        with fs.open(f"{path}/{info['weights']}", "rb") as handle:
            weights = load_safetensors(handle.read())
        state: dict[str, Any] = {}
        if with_state and info.get("state"):
            with fs.open(f"{path}/{info['state']}", "rb") as handle:
                state = torch.load(io.BytesIO(handle.read()), map_location=map_location,
                                   weights_only=True)
    except FileNotFoundError as exc:
        raise WmlabError(f"checkpoint '{name}' in {folder} names a missing file ({exc}): "
                         "delete its .json to start that stage again") from None
    except Exception as exc:  # safetensors/torch raise several types for damaged bytes
        raise WmlabError(f"checkpoint '{name}' in {folder} is damaged ({type(exc).__name__}): "
                         "delete its files to start that stage again") from None
    return Checkpoint(weights=weights, state=state, info=info)


def load_weights_into(model: torch.nn.Module, weights: dict[str, torch.Tensor],
                      source: str) -> None:
    """Load ``weights`` into ``model`` strictly, explaining any shape or key mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = []
        if wrong:
            k = wrong[0]
            detail.append(f"{k} is {tuple(weights[k].shape)} in the file but "
                          f"{tuple(expected[k].shape)} in the model")
        if missing:
            detail.append(f"missing {missing[0]}" + (f" and {len(missing) - 1} more"
                                                     if len(missing) > 1 else ""))
        if unexpected:
            detail.append(f"unexpected {unexpected[0]}")
        raise WmlabError(f"checkpoint {source} does not fit this model ({'; '.join(detail)}): "
                         "it was made with another config (e.g. z_dim); use a matching "
                         "config or another run directory")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in weights.items()})
