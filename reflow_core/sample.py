"""Text from a checkpoint, and a checkpoint's parameter table.

    from reflow_core.sample import sample, inspect_checkpoint
    sample("results/runs/reflow-smoke", "The history of", max_new_tokens=50)
    python -m reflow_core sample results/runs/reflow-smoke --prompt "The history of" --num-samples 3
    python -m reflow_core inspect results/runs/reflow-smoke
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from reflow_core import checkpoint as ckpt_io
from reflow_core.errors import InvalidArgumentError
from reflow_core.tokenizer import EOT_TOKEN, decode, encode


def _device(device: str, name: str = "device") -> torch.device:
    """The torch device for ``device`` (``auto`` picks CUDA when there is one); refused if this build cannot use it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InvalidArgumentError(f"{name} {device!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError(f"{name} {device!r}: no CUDA device is available (torch {torch.__version__}, "
                                       f"built with CUDA {torch.version.cuda}); use {name} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidArgumentError(f"{name} {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise InvalidArgumentError(f"{name} {device!r}: sampling runs on cpu or cuda")
    return dev


def check_sampling_arguments(*, max_new_tokens: int, temperature: float, top_k: int | None, num_samples: int,
                             cli: bool = False) -> None:
    """Refuse values that cannot work, before any model is loaded; ``cli`` names the options as the CLI spells them.

    A negative temperature would divide the logits by a negative number and sample the *least* likely tokens.
    """
    def name(arg: str) -> str:
        return "--" + arg.replace("_", "-") if cli else arg

    if max_new_tokens < 0:
        raise InvalidArgumentError(f"{name('max_new_tokens')} must be >= 0, got {max_new_tokens}")
    if num_samples < 1:
        raise InvalidArgumentError(f"{name('num_samples')} must be >= 1, got {num_samples}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InvalidArgumentError(f"{name('temperature')} must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < (0 if cli else 1):
        raise InvalidArgumentError(f"{name('top_k')} must be >= {0 if cli else 1}"
                                   + (" (0: no top-k filtering)" if cli else " or None") + f", got {top_k}")


def sample(
    checkpoint,
    prompt: str = "",
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int = 1337,
    num_samples: int = 1,
    device: str = "auto",
    monitor=None,
) -> list[str]:
    """``num_samples`` continuations of ``prompt`` (each returned with the prompt in front).

    ``checkpoint`` is a checkpoint or run directory, or an already loaded model (notebooks reuse one).  An empty
    prompt starts from <|endoftext|>, i.e. from the start of a document.  ``temperature=0`` is greedy decoding.
    The same seed gives the same samples on the same device.

    ``monitor`` (optional, e.g. a :class:`reflow_core.monitor.CoherenceMonitor`) is fed the hidden state of every
    generation step; afterwards ``monitor.fire_step[i]`` says whether and when it flagged sample i.  Without it,
    nothing changes.
    """
    check_sampling_arguments(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             num_samples=num_samples)
    if isinstance(checkpoint, torch.nn.Module):
        model = ckpt_io.unwrap_model(checkpoint)
        dev = next(model.parameters()).device
    else:
        dev = _device(device)
        model, _ = ckpt_io.load_model(checkpoint, dev)
    ids = encode(prompt) if prompt else [EOT_TOKEN]
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=dev)
    generator = torch.Generator(device=dev).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        if monitor is None:
            out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
        else:
            with monitor.attach(model):
                out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    finally:
        model.train(was_training)
    return [prompt + decode(row[len(ids):].tolist()) for row in out]


def inspect_checkpoint(path, *, verify: bool = True) -> list[tuple[str, tuple[int, ...], int, str]]:
    """``(name, shape, numel, dtype)`` for every tensor in a checkpoint's weights, read from the safetensors header.

    With ``verify`` the files are first checked against the sizes and hashes in meta.json.  Tied names that share
    one stored tensor (``meta["aliases"]``) are listed once, under the stored name.
    """
    meta = ckpt_io.verify_checkpoint(path) if verify else ckpt_io.read_meta(path)
    ckpt = Path(meta["path"])
    rows = []
    try:
        with safe_open(str(ckpt / ckpt_io.MODEL_FILE), framework="pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                shape = tuple(s.get_shape())
                numel = 1
                for n in shape:
                    numel *= n
                rows.append((name, shape, numel, s.get_dtype()))
    except Exception as e:  # noqa: BLE001 - a header that does not parse is a corrupt file, whatever raised
        raise ckpt_io.CorruptCheckpointError(f"{ckpt / ckpt_io.MODEL_FILE} is not a valid safetensors file ({e})")
    return rows


def _loss(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def format_inspection(path, *, verify: bool = True) -> str:
    """The parameter table with totals and the checkpoint's step, tokens and losses, as printed by the CLI."""
    rows = inspect_checkpoint(path, verify=verify)
    meta = ckpt_io.read_meta(path)
    width = max([len(r[0]) for r in rows] + [4])
    lines = [f"{'name':<{width}}  {'shape':<18} {'numel':>12}  dtype"]
    for name, shape, numel, dtype in rows:
        lines.append(f"{name:<{width}}  {str(list(shape)):<18} {numel:>12,}  {dtype}")
    total = sum(r[2] for r in rows)
    lines.append(f"{'total':<{width}}  {'':<18} {total:>12,}  ({total / 1e6:.2f}M parameters, {len(rows)} tensors)")
    if meta.get("aliases"):
        lines.append(f"tied: {json.dumps(meta['aliases'])}")
    train_cfg = meta.get("train_config") or {}
    extra = meta.get("extra") or {}
    lines.append(f"checkpoint {meta['path']}: model {train_cfg.get('model', '?')}, step {meta['step']}, "
                 f"{meta['tokens_seen']:,} tokens, train loss {_loss(extra.get('train_loss'))}, "
                 f"val loss {_loss(extra.get('val_loss'))}, saved {meta['created']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line (wired by cli.py)


def add_sample_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("checkpoint", help="checkpoint directory or run directory")
    parser.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help=">= 0; 0 = greedy")
    parser.add_argument("--top-k", type=int, default=200, help="0 = no top-k filtering")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    return parser


def run_sample_cli(args: argparse.Namespace) -> list[str]:
    # every argument is checked, under its option's name, before the checkpoint is read
    check_sampling_arguments(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             num_samples=args.num_samples, cli=True)
    _device(args.device, "--device")
    texts = sample(args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k or None, seed=args.seed, num_samples=args.num_samples, device=args.device)
    for i, text in enumerate(texts):
        if i:
            print("-" * 40)
        print(text)
    return texts


def add_inspect_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("checkpoint", help="checkpoint directory or run directory")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the files")
    return parser


def run_inspect_cli(args: argparse.Namespace) -> str:
    text = format_inspection(args.checkpoint, verify=not args.no_verify)
    print(text)
    return text
