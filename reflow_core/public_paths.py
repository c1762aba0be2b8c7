"""Paths as the record may print them: relative to the repository, never a machine's absolute folders.

Executed notebooks and result files of record are committed and published; an absolute path in them names the
machine that produced them (its checkout, a home or temp directory) and means nothing anywhere else. What they print
goes through :func:`redact`:

* a path inside the checkout becomes relative to the repository root (``<root>/results/smoke`` → ``results/smoke``,
  the root itself ``.``);
* a path under the home directory becomes ``~/…``, one under the temp directory ``$TMPDIR/…``.

Only whole path prefixes are replaced (a prefix followed by ``/``, a quote, a space or the end), longest first, so
the checkout inside a home directory is made relative rather than ``~/…``.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout this package was imported from


def machine_prefixes(repo_root: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """``(absolute prefix, what replaces it)``, longest first: the repository (``repo_root``, and the checkout this
    package runs from when that is another one), the home directory and the temp directory, each also as found
    through symlinks."""
    roots = [Path(repo_root)] if repo_root else []
    pairs = {}
    for path, public in ((Path(tempfile.gettempdir()), "$TMPDIR"), (Path.home(), "~"), (REPO_ROOT, "."),
                         *((r, ".") for r in roots)):
        for variant in {str(path), str(path.resolve())}:
            if variant not in ("/", "") and len(variant) > 1:
                pairs[variant.rstrip("/")] = public
    return sorted(pairs.items(), key=lambda kv: -len(kv[0]))


@functools.lru_cache(maxsize=8)
def _pattern(prefixes: tuple[tuple[str, str], ...]) -> re.Pattern:
    alternatives = "|".join(re.escape(p) for p, _ in prefixes)
    return re.compile(rf"(?<![\w.~$-])({alternatives})(/|(?=[\s\"'`,;:)\]}}<>|]|$))")


def redact(text: str, repo_root: str | os.PathLike | None = None) -> str:
    """``text`` with every machine path made public (module docstring)."""
    prefixes = tuple(machine_prefixes(repo_root))
    public = dict(prefixes)

    def sub(m: re.Match) -> str:
        replacement, slash = public[m.group(1)], m.group(2)
        if replacement == ".":
            return "" if slash else "."
        return replacement + slash

    return _pattern(prefixes).sub(sub, text)


def redact_json(value: Any, repo_root: str | os.PathLike | None = None) -> Any:
    """Every string inside a JSON-like value redacted (keys too)."""
    if isinstance(value, str):
        return redact(value, repo_root)
    if isinstance(value, dict):
        return {redact(k, repo_root) if isinstance(k, str) else k: redact_json(v, repo_root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_json(v, repo_root) for v in value]
    return value


def public_path(path: str | os.PathLike, repo_root: str | os.PathLike | None = None) -> str:
    """One path as the record prints it (:func:`redact` of the whole path)."""
    return redact(os.fspath(path), repo_root)


def redact_notebook_outputs(nb: dict, repo_root: str | os.PathLike | None = None) -> int:
    """Redact the text a notebook's cells printed or displayed (streams, text outputs, tracebacks) and papermill's
    record of its input and output paths, in place; the cells' sources (and so the injected parameters) are left as
    they ran. Returns how many outputs (or metadata entries) changed."""
    changed = 0
    papermill = (nb.get("metadata") or {}).get("papermill")
    if isinstance(papermill, dict):
        before = repr(papermill)
        papermill.update(redact_json({k: v for k, v in papermill.items() if k.endswith("_path") or k == "cwd"},
                                     repo_root))
        changed += repr(papermill) != before
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []) or []:
            before = repr(out)
            if "text" in out:
                out["text"] = _redact_text(out["text"], repo_root)
            if "traceback" in out:
                out["traceback"] = [redact(t, repo_root) for t in out["traceback"]]
            if "evalue" in out:
                out["evalue"] = redact(out["evalue"], repo_root)
            for mime, data in (out.get("data") or {}).items():
                if mime.startswith("text/"):
                    out["data"][mime] = _redact_text(data, repo_root)
            changed += repr(out) != before
    return changed


def _redact_text(data, repo_root):
    if isinstance(data, list):
        return [redact(t, repo_root) if isinstance(t, str) else t for t in data]
    return redact(data, repo_root) if isinstance(data, str) else data
