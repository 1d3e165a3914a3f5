"""Checkpoints: one immutable, content-addressed safetensors file per trained model.

The weights are the safetensors tensors; kind, config, scalers and meta travel as JSON in the
header's metadata, so one file is the whole model. The sha256 of the file's bytes is its
address (`<root>/<sha[:2]>/<sha>.safetensors`) and the registry keeps (uri, sha256).

Order of writes (DESIGN.md decision 4): `save_checkpoint` makes the file durable BEFORE the
caller registers it (`Store.register_model_version`), so a registry row never points at a
file that is not there. A crash in between leaves an unreferenced file, which is harmless.

Loading verifies the sha256 of the bytes before parsing anything and never unpickles: the
bytes go to the safetensors parser (Rust, no code execution) and `json`, nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from forecaster.errors import CheckpointError

FORMAT_VERSION = 1
# One metadata key holding one JSON document: safetensors keeps metadata in a map whose
# serialised order is not guaranteed, and the bytes must be identical for identical content.
_META_KEY = "forecaster"
# The statistical challenger's per-series state (meta["stat"]["state"], series x floats) is
# kept as a tensor of its own, not in the JSON header: at 100,000 series its text alone
# passed safetensors' 100 MB header limit, and a version could not be saved.
_STAT_STATE = "__forecaster_stat_state"


@dataclass(frozen=True, eq=False)  # eq on dicts of tensors would raise, not compare
class Checkpoint:
    """A trained model as it is stored. config and meta must be JSON-serialisable (tuples
    come back as lists); scalers map a series name to (center, scale)."""

    kind: str  # "lstm" | "gru" | "rnn" | "seq2seq"
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    scalers: dict[str, tuple[float, float]]
    meta: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(ckpt: Checkpoint, root: str | Path) -> tuple[str, str]:
    """Write `ckpt` under `root` (once: identical content reuses the file); return (uri, sha256).

    Call this before registering the version, never after."""
    data = _serialise(ckpt)
    sha = hashlib.sha256(data).hexdigest()
    path = Path(root).resolve() / sha[:2] / f"{sha}.safetensors"
    if not _holds(path, sha):
        _write_atomic(path, data)
    return path.as_uri(), sha


def load_checkpoint(uri: str, sha256: str) -> Checkpoint:
    """Read the checkpoint at `uri` (file:// or a local path) if its bytes hash to `sha256`."""
    path = local_path(uri)
    want = sha256.lower()
    if len(want) != 64 or any(c not in "0123456789abcdef" for c in want):
        raise CheckpointError(str(path), f"{sha256!r} is not a sha256 hex digest")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(
            str(path), "no such file (was the checkpoint directory moved or cleaned?)"
        ) from None
    except OSError as exc:
        raise CheckpointError(str(path), f"cannot be read: {exc.strerror or exc}") from exc
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise CheckpointError(
            str(path),
            f"sha256 of the file is {got}, the registry expects {want}; the file was altered "
            "or replaced, so it is not loaded",
        )
    return _parse(data, str(path))


def local_path(uri: str) -> Path:
    """The local path a checkpoint uri names; other schemes are refused for now."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise CheckpointError(uri, "a file:// uri must not name a host")
        return Path(urllib.request.url2pathname(parts.path))
    if len(parts.scheme) > 1:  # one letter is a Windows drive, i.e. a plain path
        raise CheckpointError(
            uri,
            f"scheme {parts.scheme!r} is not supported: only local paths (file:// or a plain "
            "path) are supported yet",
        )
    return Path(uri)


def _serialise(ckpt: Checkpoint) -> bytes:
    where = f"of kind {ckpt.kind!r}"
    if not isinstance(ckpt.kind, str) or not ckpt.kind:
        raise CheckpointError(where, "kind must be a non-empty string")
    tensors: dict[str, torch.Tensor] = {}
    for name, t in ckpt.state_dict.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise CheckpointError(where, f"state_dict entry {name!r} is not a named tensor")
        # A copy per tensor: tied or sliced weights share storage, which safetensors refuses.
        tensors[name] = t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
    meta = ckpt.meta
    stat = meta.get("stat")
    if isinstance(stat, dict) and "state" in stat:
        import numpy as np

        state = np.asarray(stat["state"], dtype=np.float64)
        tensors[_STAT_STATE] = torch.from_numpy(np.ascontiguousarray(state))
        meta = {**meta, "stat": {k: v for k, v in stat.items() if k != "state"}}
    body = {
        "format": FORMAT_VERSION,
        "kind": ckpt.kind,
        "config": ckpt.config,
        "scalers": {str(k): [float(c), float(s)] for k, (c, s) in ckpt.scalers.items()},
        "meta": meta,
    }
    try:
        # Sorted keys: the same content always gives the same bytes, hence the same address.
        text = json.dumps(body, sort_keys=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(where, f"config, scalers or meta is not plain JSON: {exc}") from exc
    return safetensors.torch.save(tensors, metadata={_META_KEY: text})


def _parse(data: bytes, where: str) -> Checkpoint:
    """Checkpoint from verified bytes. Only safetensors' parser and json touch them."""
    try:
        tensors = safetensors.torch.load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(where, f"not a safetensors file ({exc})") from exc
    # safetensors validated the layout: 8-byte little-endian header length, then JSON.
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    text = (header.get("__metadata__") or {}).get(_META_KEY)
    if text is None:
        raise CheckpointError(where, "a safetensors file, but not a forecaster checkpoint")
    try:
        body = json.loads(text)
        fmt = body["format"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(where, f"malformed checkpoint metadata: {exc!r}") from exc
    if fmt != FORMAT_VERSION:
        raise CheckpointError(
            where, f"format {fmt!r} is not {FORMAT_VERSION}: written by another forecaster version"
        )
    state = tensors.pop(_STAT_STATE, None)
    try:
        meta = dict(body["meta"])
        if state is not None:
            meta["stat"] = {**meta["stat"], "state": state.numpy()}
        return Checkpoint(
            kind=str(body["kind"]),
            config=dict(body["config"]),
            state_dict=tensors,
            scalers={k: (float(c), float(s)) for k, (c, s) in body["scalers"].items()},
            meta=meta,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(where, f"malformed checkpoint metadata: {exc!r}") from exc


def _holds(path: Path, sha: str) -> bool:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == sha
    except OSError:
        return False


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename: readers see no file or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o444)  # immutable by intent: nothing rewrites a content address
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename (and a new shard folder) is durable only once its directory is synced.
    for folder in (path.parent, path.parent.parent):
        _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # Windows cannot open a directory for fsync
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
