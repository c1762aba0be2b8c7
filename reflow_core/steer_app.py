"""The live steering app: ``python -m reflow_core steer`` (``make steer``) serves a steering panel for any prompt.

The book's steering chapter shows a panel whose every setting was precomputed (:mod:`reflow_core.steering_grid`), so
that it answers in a static page; this app is the other half, the live :class:`reflow_core.steering.SteeringPanel`
on the scale's trained reFlow model, recomputed on every change of a control. It is the notebook
``reflow_core/assets/steer_app.ipynb`` served with Voilà (code hidden, one kernel per open page):

* the model is the scale's trained reflow checkpoint (``results/<scale>/checkpoints/reflow-seed<seed>``); at
  ``test`` it is trained first when missing (seconds), at a larger scale a missing one is not trained behind the
  user's back (``make book SCALE=…`` does that): the app says so and serves the ``test`` model instead;
* it listens on 127.0.0.1 only, on ``--port`` (0: a free port), and prints its address once it accepts connections;
* Ctrl-C stops Voilà, which shuts its kernels down; whatever is left below it is killed, so no process outlives the
  command (it exits 0: stopping is how the app ends).

Voilà runs as a child in its own session, so a Ctrl-C in the terminal reaches this process only and the shutdown
happens in one order: Voilà first (SIGTERM, its own clean stop), then any straggler.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from reflow_core.errors import UserError

APP_NOTEBOOK = Path(__file__).resolve().parent / "assets" / "steer_app.ipynb"
ENV_SCALE, ENV_RESULTS = "REFLOW_STEER_SCALE", "REFLOW_STEER_RESULTS"  # what the app notebook reads
PROMPT = "The service was terrible and the food was"  # the chapter's panel prompt
READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 15.0


# ----------------------------------------------------------------------------------------------
# Inside the app's kernel


def app_panel(scale: str, results_dir: str | None = None):
    """The live panel on ``scale``'s trained reFlow model, opened on the chapter's setting (sentiment, the early
    layers, α = 2 × the median residual norm), and a line saying which model it is: ``(SteeringPanel, Markdown)``."""
    from IPython.display import Markdown

    from reflow_core.experiments.emotion import layer_ranges, median_residual_norm
    from reflow_core.runs import load_trained
    from reflow_core.steering import steering_panel
    from reflow_core.stimuli import load_stimuli

    model, label = load_trained(scale, "reflow", results_dir, train_if_missing=False)
    sent = load_stimuli("sentiment")
    unit = median_residual_norm(model, sent["prompts"] + sent["negative_prompts"])
    panel = steering_panel(model, prompt=PROMPT, layers=layer_ranges(model.config.n_layer)["early"],
                           alpha=round(2 * unit, 2), alpha_max=round(8 * unit, 2), word=" ocean")
    about = Markdown(f"Model: reFlow checkpoint `{label}` at scale **{scale}** ({model.config.n_layer} layers, "
                     f"{model.config.n_signals} signals). α is a length in the residual stream; its median norm ‖h‖ "
                     f"is {unit:.3g} here, and the panel opens at 2 × ‖h‖.")
    return panel, about


# ----------------------------------------------------------------------------------------------
# The server


def ensure_app_model(scale: str, results_dir: str | os.PathLike | None = None,
                     say=print) -> tuple[str, Path]:
    """The scale and results folder whose trained reFlow model the app serves: ``scale``'s if its checkpoint exists,
    trained first at ``test``; otherwise the ``test`` model (trained if needed), and ``say`` tells why."""
    from reflow_core.checkpoint import find_checkpoint
    from reflow_core.public_paths import public_path
    from reflow_core.runs import ensure_model
    from reflow_core.scales import checkpoint_dir, resolve_results_dir, scale_rank

    scale_rank(scale)
    run = checkpoint_dir(scale, "reflow", results_dir)
    if find_checkpoint(run) is None and scale != "test":
        say(f"no trained reflow checkpoint at scale {scale} ({public_path(run)}); `make book SCALE={scale}` trains "
            f"it. Serving the test-scale model instead.")
        scale, results_dir = "test", None
    if scale == "test":
        ensure_model("test", "reflow", results_dir)  # seconds; nothing to do when it is stored
    return scale, resolve_results_dir(results_dir, scale)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def voila_command(port: int, host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "voila", str(APP_NOTEBOOK), "--no-browser", f"--Voila.ip={host}",
            f"--Voila.port={port}", "--Voila.port_retries=0", "--VoilaConfiguration.show_tracebacks=True",
            "--Voila.log_level=ERROR"]


def stop(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """Stop Voilà (SIGTERM: it shuts its kernels down), then kill whatever of its process tree is left."""
    from reflow_core.book import _descendants, _kill_all, _running

    tree = _descendants(proc.pid)  # the kernels: children of Voilà, each in a session of its own
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            tree += _descendants(proc.pid)
            _kill_all([proc.pid])
            proc.wait()
    _kill_all([p for p in tree if _running(p)])


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop_on_signals() -> None:
    """Ctrl-C (SIGINT) and SIGTERM both stop the app cleanly. Set explicitly: a process started in the background of
    a non-interactive shell inherits SIGINT as *ignored*, and Python then installs no KeyboardInterrupt handler, so
    Ctrl-C (or a test's SIGINT) would leave the server running."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_interrupt)


def serve(scale: str = "test", *, port: int = 0, host: str = "127.0.0.1",
          results_dir: str | os.PathLike | None = None, ready_timeout_s: float = READY_TIMEOUT_S) -> int:
    """Serve the app until Ctrl-C or SIGTERM (then 0) or until Voilà exits by itself (then its exit code)."""
    try:
        import voila  # noqa: F401
    except ImportError:
        raise UserError("the steering app needs Voilà: pip install -e '.[book]' (or `make steer`)") from None
    _stop_on_signals()
    scale, results = ensure_app_model(scale, results_dir, say=lambda m: print(m, flush=True))
    port = int(port) or free_port(host)
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, ENV_SCALE: scale, ENV_RESULTS: str(results),
           "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(voila_command(port, host), env=env, cwd=package_root, start_new_session=True)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not _accepts(host, port):
            if proc.poll() is not None:
                raise UserError(f"Voilà exited with code {proc.returncode} before listening on {host}:{port}")
            if time.monotonic() > deadline:
                raise UserError(f"Voilà did not listen on {host}:{port} within {ready_timeout_s:.0f} s")
            time.sleep(0.2)
        print(f"steering app (reFlow, scale {scale}): http://{host}:{port}/  (Ctrl-C stops it)", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        stop(proc)
        print("steering app stopped", flush=True)
        return 0
    finally:
        stop(proc)


def add_steer_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from reflow_core.scales import SCALE_NAMES

    parser.add_argument("--scale", choices=SCALE_NAMES, default="test",
                        help="whose trained reflow model to serve (default: test, trained in seconds if missing; a "
                             "larger scale without a checkpoint falls back to test)")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default 0: a free one)")
    parser.add_argument("--results-dir", metavar="DIR", default=None,
                        help="results folder of the scale (default: results/<scale>)")
    return parser


def run_steer_cli(args: argparse.Namespace) -> int:
    return serve(args.scale, port=args.port, results_dir=args.results_dir)
