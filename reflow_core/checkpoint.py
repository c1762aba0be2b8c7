"""Safe, atomic checkpoints: safetensors for every tensor, JSON for everything else, nothing ever unpickled.

A checkpoint is a directory::

    model.safetensors      the weights (tied / shared tensors stored once, see ``meta["aliases"]``)
    optimizer.safetensors  AdamW's per-parameter tensors, keyed ``exp_avg/<param name>`` (names, not ids, so a
                           checkpoint survives a change in parameter order or a DDP / torch.compile wrapper)
    meta.json              format version, model and train configs, step, tokens seen, optimizer scalars, RNG
                           states (base64), size and sha256 of each .safetensors file, and a checksum of itself

Why not ``torch.save``: a pickle can run arbitrary code when loaded, and checkpoints travel (between machines, from
GPU runs to laptops, from strangers).  safetensors only ever parses a JSON header and raw bytes.

Atomicity: a run writes ``<out_dir>/.tmp-<name>-<step>-pid<pid>/``, fsyncs it, and swaps it in for ``<out_dir>/ckpt/``
by renames (``ckpt`` → ``ckpt.old``, tmp → ``ckpt``, delete ``ckpt.old``).  A crash at any point leaves either
``ckpt/`` or ``ckpt.old/`` complete, and :func:`find_checkpoint` picks whichever is there, so the last good
checkpoint survives.  A temporary folder is removed by a later save only once the PID in its name is dead: it may
be a live process's save in progress (a run's folder is locked against a second run, but any process can call
:func:`save_checkpoint`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from reflow_core.errors import UserError
from reflow_core.fileio import pid_alive, sha256_file

FORMAT = "reflow-checkpoint"
FORMAT_VERSION = 1
CKPT_DIR = "ckpt"
OLD_DIR = "ckpt.old"
TMP_PREFIX = ".tmp-"
TMP_PID = "-pid"  # .tmp-<name>-<step>-pid<pid>: whose save in progress it is
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
META_FILE = "meta.json"


def _umask() -> int:
    """The process umask, read without os.umask()'s set-and-restore (which races with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


class CorruptCheckpointError(UserError, ValueError):
    """A checkpoint file is missing, truncated, altered or not in the safetensors format; nothing was loaded."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """No checkpoint at a path (neither a checkpoint directory nor a run directory holding one)."""


# ----------------------------------------------------------------------------------------------
# Small helpers


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make renames/creations inside a directory durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_dead_temporaries(out_dir: Path) -> None:
    """Delete the ``.tmp-*`` folders of saves that died half-way; a live writer's (its PID runs) are left alone.

    Folders without ``-pid<N>`` come from versions that did not record the writer and are taken as dead.
    """
    for tmp in out_dir.glob(f"{TMP_PREFIX}*"):
        _, marked, pid = tmp.name.rpartition(TMP_PID)
        if marked and pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)


def _b64(t: torch.Tensor | np.ndarray | bytes) -> str:
    if isinstance(t, torch.Tensor):
        t = t.cpu().contiguous().numpy()
    if isinstance(t, np.ndarray):
        t = t.tobytes()
    return base64.b64encode(t).decode("ascii")


def _unb64_uint8(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def meta_checksum(meta: dict) -> str:
    """sha256 of the canonical JSON of ``meta`` without its own ``checksum`` field (guards meta.json itself)."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Tensors ↔ files


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses two names for one storage (tied weights); keep the first name, record the others.

    Views that share storage but are not the same tensor (different shape/offset) are cloned instead.
    """
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in state.items():
        t = t.detach()
        if t.device.type == "meta":
            raise ValueError(f"cannot save {name}: it is on the meta device (no data)")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in storages:
            t = t.clone()  # a different view of a shared storage: store its own copy
        seen[key] = name
        storages.add(ptr)
        kept[name] = t.cpu().contiguous()
    return kept, aliases


def _optimizer_to_named(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> tuple[dict, dict]:
    """Split an optimizer's state into tensors keyed ``<state key>/<param name>`` and JSON scalars per name."""
    id_to_name = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    groups = []
    for group in optimizer.param_groups:
        names = []
        for p in group["params"]:
            if id(p) not in id_to_name:
                raise ValueError("the optimizer holds a parameter that is not in the model; cannot name its state")
            name = id_to_name[id(p)]
            names.append(name)
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    tensors[f"{key}/{name}"] = value.detach().cpu().contiguous()
                elif isinstance(value, torch.Tensor):
                    scalars.setdefault(name, {})[key] = {"value": value.item(), "tensor": True,
                                                         "dtype": str(value.dtype).removeprefix("torch.")}
                else:
                    scalars.setdefault(name, {})[key] = {"value": value, "tensor": False}
        hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        hyper = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in hyper.items()}
        groups.append({**hyper, "params": names})
    return tensors, {"class": type(optimizer).__name__, "param_groups": groups, "state": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                         tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore per-parameter optimizer state saved by :func:`save_checkpoint`, matching parameters by name.

    The optimizer's own hyper-parameters (lr, betas, fused…) are kept as constructed: they come from the current
    config (the schedule sets lr every step), while the state (moments, step counts) comes from the checkpoint.
    """
    saved = meta.get("optimizer")
    if saved is None:
        raise CorruptCheckpointError("this checkpoint has no optimizer state (it was saved for inference only)")
    if saved["class"] != type(optimizer).__name__:
        raise ValueError(f"checkpoint optimizer is {saved['class']}, this run uses {type(optimizer).__name__}")
    id_to_name = {id(p): n for n, p in unwrap_model(model).named_parameters()}
    current = optimizer.state_dict()
    by_name: dict[str, dict] = {}
    for name, entries in saved["state"].items():
        for key, e in entries.items():
            value = torch.tensor(e["value"], dtype=getattr(torch, e["dtype"])) if e["tensor"] else e["value"]
            by_name.setdefault(name, {})[key] = value
    for tkey, t in tensors.items():
        key, _, name = tkey.partition("/")
        by_name.setdefault(name, {})[key] = t
    state, matched = {}, set()
    for group, group_sd in zip(optimizer.param_groups, current["param_groups"]):
        for p, index in zip(group["params"], group_sd["params"]):
            name = id_to_name.get(id(p))
            if name in by_name:
                state[index] = by_name[name]
                matched.add(name)
    unmatched = sorted(set(by_name) - matched)
    if unmatched:
        raise ValueError(f"checkpoint has optimizer state for parameters this model lacks: {unmatched[:5]}")
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def _rng_state() -> dict:
    """Every RNG a run might touch, encoded for JSON (torch states are uint8 tensors → base64)."""
    np_state = np.random.get_state()
    state = {
        "torch_cpu": _b64(torch.get_rng_state()),
        "numpy": {"kind": np_state[0], "keys": _b64(np_state[1].astype(np.uint32)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(rng: dict) -> None:
    """Put the RNGs back as a checkpoint recorded them (CUDA only when the device count matches)."""
    torch.set_rng_state(_unb64_uint8(rng["torch_cpu"]))
    n = rng.get("numpy")
    if n:
        keys = np.frombuffer(base64.b64decode(n["keys"]), dtype=np.uint32).copy()
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = rng.get("python")
    if p:
        random.setstate((p[0], tuple(p[1]), p[2]))
    cuda = rng.get("torch_cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64_uint8(s) for s in cuda])


# ----------------------------------------------------------------------------------------------
# Saving


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())  # safetensors creates 0600 files; give them the usual permissions
    _fsync_file(path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def save_checkpoint(
    out_dir: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: int,
    config: Any = None,
    tokens_seen: int = 0,
    extra: dict | None = None,
    name: str = CKPT_DIR,
) -> Path:
    """Write a checkpoint of ``model`` (+ ``optimizer``) as ``<out_dir>/<name>/`` (default ``ckpt``), atomically;
    returns that path.

    ``config`` is the train config (a dataclass with ``to_dict`` or a dict); ``extra`` any JSON-able run state
    (losses, wall time).  The previous ``<name>/`` stays in place until the new one is complete on disk.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = unwrap_model(model)
    _remove_dead_temporaries(out_dir)
    tmp = out_dir / f"{TMP_PREFIX}{name}-{step}{TMP_PID}{os.getpid()}"
    tmp.mkdir()

    weights, aliases = _dedupe_shared(raw.state_dict())
    files = {MODEL_FILE: _write_safetensors(tmp / MODEL_FILE, weights, {"format": FORMAT, "step": str(step)})}
    optimizer_meta = None
    if optimizer is not None:
        opt_tensors, optimizer_meta = _optimizer_to_named(optimizer, raw)
        files[OPTIMIZER_FILE] = _write_safetensors(tmp / OPTIMIZER_FILE, opt_tensors, {"format": FORMAT})

    if config is not None and hasattr(config, "to_dict"):
        config = config.to_dict()
    model_config = raw.config.to_dict() if hasattr(raw, "config") and hasattr(raw.config, "to_dict") else None
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch_version": torch.__version__,
        "step": int(step),
        "tokens_seen": int(tokens_seen),
        "model_config": model_config,
        "train_config": config,
        "num_params": sum(t.numel() for t in weights.values()),
        "aliases": aliases,
        "optimizer": optimizer_meta,
        "rng": _rng_state(),
        "files": files,
        "extra": extra or {},
    }
    meta["checksum"] = meta_checksum(meta)
    with open(tmp / META_FILE, "w") as f:  # written last: a directory without it is never a checkpoint
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)

    current, old = out_dir / name, out_dir / f"{name}.old"
    if current.exists():
        if old.exists():  # `current` is complete, so an older leftover is no longer needed
            shutil.rmtree(old)
        os.rename(current, old)
    os.rename(tmp, current)
    _fsync_dir(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return current


# ----------------------------------------------------------------------------------------------
# Loading


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint directory for ``path``: itself if it holds meta.json, else ``ckpt/``, else ``ckpt.old/``
    (what a crash between the two renames of a save leaves).  None if there is none.

    A present-but-corrupt ``ckpt/`` is returned (and refused by the loader), never silently skipped for an older one;
    so is ``path`` itself when it looks like a checkpoint folder (weights in it, or named ``ckpt``) but lacks
    meta.json: the loader then says it is incomplete rather than that there is no checkpoint.
    """
    path = Path(path)
    if path.is_file():
        path = path.parent
    if (path / META_FILE).is_file():
        return path
    if path.is_dir() and ((path / MODEL_FILE).exists() or path.name in (CKPT_DIR, OLD_DIR)):
        return path
    if (path / CKPT_DIR).is_dir():
        return path / CKPT_DIR
    if (path / OLD_DIR / META_FILE).is_file():
        return path / OLD_DIR
    return None


def read_meta(path: str | Path) -> dict:
    """meta.json of a checkpoint, checked (format, version, self-checksum); does not read the tensors."""
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise CheckpointNotFoundError(f"no checkpoint at {path} (expected {META_FILE}, or a {CKPT_DIR}/ directory)")
    meta_path = ckpt / META_FILE
    if not meta_path.is_file():
        raise CorruptCheckpointError(f"{ckpt} has no {META_FILE}: the checkpoint is incomplete")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{meta_path} is not valid JSON ({e}); the checkpoint is corrupt") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{meta_path} is not a {FORMAT} metadata file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CorruptCheckpointError(f"{meta_path} has format version {meta.get('format_version')}; "
                                     f"this code reads version {FORMAT_VERSION}")
    if meta.get("checksum") != meta_checksum(meta):
        raise CorruptCheckpointError(f"{meta_path} does not match its own checksum: it was altered or damaged")
    meta["path"] = str(ckpt)
    return meta


def _verify_file(ckpt: Path, name: str, meta: dict, verify: bool) -> Path:
    """Size always, sha256 when ``verify``: a file must match what meta.json recorded before it is parsed."""
    path = ckpt / name
    expected = meta["files"].get(name)
    if expected is None:
        raise CorruptCheckpointError(f"{ckpt}/{META_FILE} lists no {name}")
    if not path.is_file():
        raise CorruptCheckpointError(f"{path} is missing")
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise CorruptCheckpointError(f"{path} has {size} bytes, the checkpoint recorded {expected['bytes']}: "
                                     "the file is truncated or was replaced")
    if verify:
        actual = sha256_file(path)
        if actual != expected["sha256"]:
            raise CorruptCheckpointError(f"{path} has sha256 {actual}, the checkpoint recorded "
                                         f"{expected['sha256']}: the file is corrupt or was altered")
    return path


def verify_checkpoint(path: str | Path) -> dict:
    """Check meta.json and the size and sha256 of every file it lists, without parsing tensors; returns meta."""
    meta = read_meta(path)
    for name in meta["files"]:
        _verify_file(Path(meta["path"]), name, meta, True)
    return meta


def _load_verified(ckpt: Path, name: str, meta: dict, verify: bool) -> dict[str, torch.Tensor]:
    path = _verify_file(ckpt, name, meta, verify)
    try:
        return load_file(str(path))  # parses a JSON header and raw bytes; never unpickles
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptCheckpointError(f"{path} is not a valid safetensors file ({e}); refusing to load it") from None


def load_checkpoint(path: str | Path, *, optimizer: bool = True,
                    verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict]:
    """Read a checkpoint: ``(model state_dict, optimizer tensors or None, meta)``, all tensors on the CPU.

    ``path`` may be a checkpoint directory, a run directory (its ``ckpt/``) or a file inside a checkpoint.
    Every file is checked against the size and sha256 recorded in meta.json before it is parsed.
    """
    meta = read_meta(path)
    ckpt = Path(meta["path"])
    state = _load_verified(ckpt, MODEL_FILE, meta, verify)
    for alias, target in meta.get("aliases", {}).items():
        if target not in state:
            raise CorruptCheckpointError(f"alias {alias} → {target}, but {target} is not in {MODEL_FILE}")
        state[alias] = state[target]
    opt = None
    if optimizer and meta.get("optimizer") is not None:
        opt = _load_verified(ckpt, OPTIMIZER_FILE, meta, verify)
    return state, opt, meta


def load_model(path: str | Path, device: str | torch.device = "cpu", *, verify: bool = True):
    """A model ready for experiments: ``(GPT in eval mode on device, meta)``."""
    from reflow_core.config import ModelConfig
    from reflow_core.model import GPT, build_model

    state, _, meta = load_checkpoint(path, optimizer=False, verify=verify)
    if not meta.get("model_config"):
        raise CorruptCheckpointError(f"{meta['path']} records no model config; cannot rebuild the model")
    config = ModelConfig.from_dict(meta["model_config"])
    # Build on the meta device and adopt the loaded tensors: no time spent on a random init that is overwritten.
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, strict=True, assign=True)
    left = {n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta}
    if left <= {"rope_cos", "rope_sin"}:
        if left:  # non-persistent buffers are not in the checkpoint: recompute them
            from reflow_core.model import rope_tables

            model.rope_cos, model.rope_sin = rope_tables(config.d_model // config.n_head, config.block_size,
                                                         config.rope_theta)
    else:  # a buffer we do not know how to rebuild: take the slow, general path
        model = build_model(config, "cpu")
        model.load_state_dict(state, strict=True)
    model = model.to(device)
    model.eval()
    return model, meta
