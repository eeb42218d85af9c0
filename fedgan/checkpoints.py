"""Checkpoints written atomically beside a SHA-256 file, and loaded with weights_only=True."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from fedgan.models import Generator

Tensor = torch.Tensor


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupted or not a checkpoint."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, a file-size limit); the ones before it are untouched."""


MAX_GENERATOR_PARAMETERS = 10 ** 9  # load_generator refuses a generator_config beyond this (4 GB of float32)
CLAIM = "claim.json"  # in a run's checkpoint folder: the run that took the folder


def plain(tree: Any) -> Any:
    """numpy scalars and arrays as Python numbers and tensors, at any depth: what weights_only=True loads back."""
    if isinstance(tree, np.generic):
        return tree.item()
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(tree.copy())
    if isinstance(tree, Mapping):
        return {k: plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(plain(v) for v in tree)
    return tree


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk, a size limit, Ctrl-C: no partial file is left to fill the disk further
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


def pack_grid(images: Tensor) -> Tensor:
    """A sample grid in [-1, 1] as uint8, as a checkpoint keeps it: a quarter of float32's bytes, and the 256 levels
    that a saved picture of it has anyway (the grids of all rounds are most of a late checkpoint)."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def unpack_grid(images: Tensor) -> Tensor:
    """pack_grid's uint8 back as float in [-1, 1] (a checkpoint from before pack_grid holds the floats: kept)."""
    return images.float().div(127.5).sub(1) if images.dtype == torch.uint8 else images


def checksum_path(path: str | os.PathLike) -> Path:
    """The SHA-256 file beside a checkpoint (`sha256sum -c` reads it)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write atomically (temporary file, fsync, rename) with a SHA-256 file; never replaces an existing checkpoint.

    The checksum is written first, so a run killed at any moment leaves either a complete checkpoint with its
    checksum or no checkpoint of that round (a stray checksum or .partial file is ignored and replaced). numpy
    values are saved as the Python numbers and tensors they are, and the bytes are loaded back with weights_only
    before anything is written: a checkpoint that saves always loads.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; checkpoints are never overwritten")
    buffer = io.BytesIO()
    torch.save(plain(dict(payload)), buffer)
    data = buffer.getvalue()
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as error:  # an object of a user's class, say, in a strategy's state or log
        raise CheckpointError(f"{path} would not load with weights_only=True, so it is not written: "
                              f"{str(error).strip().splitlines()[0][:300]}") from error
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _write_atomically(checksum_path(path), f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode())
        _write_atomically(path, data)
    except OSError as error:
        checksum_path(path).unlink(missing_ok=True)
        before = [p.name for p in list_checkpoints(path.parent) if p != path]
        kept = (f"the newest checkpoint there, {before[-1]}, is untouched" if before else
                "no earlier checkpoint is there")
        raise CheckpointWriteError(
            f"{path.name} ({len(data) / 1e6:.1f} MB) could not be written into {path.parent}: "
            f"{error.strerror or error}; {kept}. Free space there (or set keep_checkpoints to keep fewer), then "
            "resume the run (resume=True) to continue from it") from error
    return path


def prune_checkpoints(run_dir: str | os.PathLike, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints of a run (None: keep all), with their SHA-256 files; returns
    what was deleted. Files set aside as bad are not checkpoints and stay."""
    found = list_checkpoints(run_dir)
    old = found[:-keep] if keep is not None else []
    for path in old:
        path.unlink()
        checksum_path(path).unlink(missing_ok=True)
    return old


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's contents, checked against its SHA-256 file and loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = path.read_bytes()
    expected = checksum_path(path)
    if expected.is_file():
        digest = hashlib.sha256(data).hexdigest()
        recorded = (expected.read_text().split() or [""])[0]
        if digest != recorded:
            raise CheckpointError(f"{path} is corrupted or truncated: its SHA-256 {digest[:12]}... does not match "
                                  f"{expected.name} ({recorded[:12]}...); load an earlier checkpoint of the run "
                                  "(latest_good_checkpoint finds it)")
    try:
        return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(error).__name__}: {error})") from error


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """A run's checkpoints, round_<number>.pt, oldest round first (by number: round_10000 comes after round_9999)."""
    found = [p for p in Path(run_dir).glob("round_*.pt") if p.stem.removeprefix("round_").isdigit()]
    return sorted(found, key=lambda p: int(p.stem.removeprefix("round_")))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def newest_loadable(run_dir: str | os.PathLike, log: bool) -> tuple[Path | None, dict[str, Any] | None]:
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as error:
            if log:
                print(f"skipping a bad checkpoint: {error}")
    return None, None


def latest_good_checkpoint(run_dir: str | os.PathLike, *, log: bool = True) -> Path | None:
    """The newest checkpoint of a run that passes its checksum and loads; the bad ones after it are reported."""
    return newest_loadable(run_dir, log)[0]


def save_history(history: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """history.json (everything) and history.csv (one row a round, scalar columns, metrics flattened)."""
    import csv

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / "history.json", out_dir / "history.csv"
    json_path.write_text(json.dumps(list(history), indent=1))
    rows = []
    for record in history:
        row = {k: v for k, v in record.items() if not isinstance(v, (list, dict))}
        row.update({k: v for k, v in record.get("metrics", {}).items() if not isinstance(v, list)})
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def _generator_from(path: Path, config: Any) -> Generator:
    """A generator of a checkpoint's `generator_config`, sized on the meta device before any memory is taken."""
    def refuse(reason: str) -> CheckpointError:
        return CheckpointError(f"{path}: its generator_config {config!r:.200} {reason}")
    if not isinstance(config, Mapping):
        raise refuse("is not a mapping of Generator's arguments")
    try:
        with torch.device("meta"):
            size = sum(p.numel() for p in Generator(**config).parameters())
    except (TypeError, ValueError, RuntimeError) as error:
        raise refuse(f"does not make a Generator ({type(error).__name__}: {error})") from error
    if size > MAX_GENERATOR_PARAMETERS:
        raise refuse(f"makes a generator of {size:,} parameters, over the {MAX_GENERATOR_PARAMETERS:,} allowed")
    return Generator(**config)


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> Generator:
    """Rebuild the global generator saved in a checkpoint, in eval mode."""
    checkpoint = load_checkpoint(path, device)
    generator = _generator_from(Path(path), checkpoint.get("generator_config")).to(device)
    try:
        generator.load_state_dict(checkpoint["generator"])
    except (KeyError, RuntimeError, TypeError) as error:
        raise CheckpointError(f"{path}: its generator does not load ({type(error).__name__}: {error})") from error
    return generator.eval()


def run_folders(checkpoint_dir: Path, run_name: str) -> list[Path]:
    """The folders of the runs named `run_name`: run_name itself and run_name-2, -3, ... (not run_name-big)."""
    own = re.compile(re.escape(run_name) + r"(-\d+)?")
    return [p for p in checkpoint_dir.glob(run_name + "*") if p.is_dir() and own.fullmatch(p.name)]


def claim_run_dir(checkpoint_dir: Path, out_dir: Path, run_name: str) -> Path:
    """A new run's folder, checkpoint_dir/run_name or run_name-2, -3, ...: the first whose checkpoint and output
    folders hold nothing, taken by creating its claim file exclusively, so that two runs starting at once never
    share one. Writing the claim also finds a folder checkpoints cannot be written in, before any training."""
    candidate, n = run_name, 1
    while True:
        folder = checkpoint_dir / candidate
        if not any(d.is_dir() and any(d.iterdir()) for d in (folder, out_dir / candidate)):
            try:
                write_claim(folder, run_name, exclusive=True)
                return folder
            except FileExistsError:  # another run claimed it first
                pass
        n += 1
        candidate = f"{run_name}-{n}"


def write_claim(folder: Path, run_name: str, *, exclusive: bool) -> None:
    """Write a run's claim file in its checkpoint folder (`exclusive`: only if there is none yet, else
    FileExistsError); any other failure means checkpoints cannot be written there: a clear PermissionError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / CLAIM, "x" if exclusive else "w") as claim:
            json.dump({"run_name": run_name, "pid": os.getpid(), "time": time.time()}, claim)
    except FileExistsError:
        if folder.is_dir():
            raise
        raise PermissionError(f"checkpoints cannot be written in {folder.parent}: a file named {folder.name} "
                              "stands in the way; set checkpoint_dir to a writable folder") from None
    except OSError as error:
        raise PermissionError(f"checkpoints cannot be written in {folder.parent} ({error}); set checkpoint_dir "
                              "to a writable folder") from error


def restore_newest(run_dir: Path, restore: Callable[[Path, dict], None], log: bool) -> Path | None:
    """Hand `restore` the newest checkpoint of a run that loads and restores, and return its path; each newer one
    that fails (its checksum, loading, or `restore` raising CheckpointError) is set aside. None: none did."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            restore(path, load_checkpoint(path))
            return path
        except CheckpointError as error:
            if log:
                print(f"skipping a bad checkpoint: {error}")
            set_aside(path, log)
    return None


def flat_adam_states(client_store: Mapping[int, dict], models: Mapping[str, nn.Module]) -> None:
    """Format 2 checkpoints kept each client's Adam moments by parameter name: flattened in place into the one
    format ({"step", "exp_avg": [P], "exp_avg_sq": [P]}, the module's named_parameters order)."""
    for store in client_store.values():
        for which, model in models.items():
            kept = store.get(f"{which}_opt")
            if kept is not None and isinstance(kept["exp_avg"], Mapping):
                store[f"{which}_opt"] = {"step": kept["step"], **{
                    m: torch.cat([kept[m][name].flatten() for name, _ in model.named_parameters()])
                    for m in ("exp_avg", "exp_avg_sq")}}


def set_aside(path: Path, log: bool) -> Path:
    """Rename a checkpoint that did not pass its checksum or did not load (and its checksum file) to *.bad, or
    *.bad-2, -3, ... beside an earlier one: never deleted, never overwritten; the run can write the round again."""
    aside, n = path.with_name(path.name + ".bad"), 1
    while aside.exists() or checksum_path(aside).exists():
        n += 1
        aside = path.with_name(f"{path.name}.bad-{n}")
    path.rename(aside)
    if checksum_path(path).exists():
        checksum_path(path).rename(checksum_path(aside))
    if log:
        print(f"set aside {path} as {aside.name}: it did not pass its checksum or did not load")
    return aside
