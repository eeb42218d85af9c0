"""Checkpoints written atomically beside a SHA-256 file, and loaded with weights_only=True."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from fedgan.models import Generator

Tensor = torch.Tensor


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupted or not a checkpoint."""


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def checksum_path(path: str | os.PathLike) -> Path:
    """The SHA-256 file beside a checkpoint (`sha256sum -c` reads it)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write atomically (temporary file, fsync, rename) with a SHA-256 file; never replaces an existing checkpoint.

    The checksum is written first, so a run killed at any moment leaves either a complete checkpoint with its
    checksum or no checkpoint of that round (a stray checksum or .partial file is ignored and replaced).
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; checkpoints are never overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(dict(payload), buffer)
    data = buffer.getvalue()
    _write_atomically(checksum_path(path), f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode())
    _write_atomically(path, data)
    return path


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
    """A run's checkpoints, oldest round first."""
    return sorted(Path(run_dir).glob("round_*.pt"))


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


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> Generator:
    """Rebuild the global generator saved in a checkpoint, in eval mode."""
    checkpoint = load_checkpoint(path, device)
    generator = Generator(**checkpoint["generator_config"]).to(device)
    generator.load_state_dict(checkpoint["generator"])
    return generator.eval()


def pick_run_dir(checkpoint_dir: Path, out_dir: Path, run_name: str, resume: bool) -> Path:
    """checkpoint_dir/run_name, or run_name-2, -3, ... so that no earlier run's files are overwritten.

    A name is free when neither checkpoint_dir/name nor out_dir/name holds anything; `resume` takes the most
    recent run of this name that has a checkpoint.
    """
    numbered = sorted(checkpoint_dir.glob(run_name + "-*"), key=lambda p: p.stat().st_mtime)
    existing = [checkpoint_dir / run_name] + numbered
    existing = [p for p in existing if latest_checkpoint(p) is not None]
    if resume and existing:
        return existing[-1]
    candidate, n = run_name, 1
    while any(d.is_dir() and any(d.iterdir()) for d in (checkpoint_dir / candidate, out_dir / candidate)):
        n += 1
        candidate = f"{run_name}-{n}"
    return checkpoint_dir / candidate


def set_aside_after(run_dir: Path, good: Path, log: bool) -> None:
    """Rename a run's checkpoints newer than `good` (they failed to load) to *.bad, so the run can write them again."""
    for path in list_checkpoints(run_dir):
        if path.name > good.name:
            aside = path.with_name(path.name + ".bad")
            path.rename(aside)
            if checksum_path(path).exists():
                checksum_path(path).rename(checksum_path(aside))
            if log:
                print(f"set aside {path} as {aside.name}: it did not pass its checksum or did not load")
