"""The fault suite: bad inputs and real faults (two runs in one folder, divergence, kills, Ctrl-C, failing chapters).

Each test is one case of issue 14 and says what a user must see: a one-line ``reflow_core: error:`` message and exit
code 2 for anything the user can fix (a traceback always means a bug), a refusal where going on would give a wrong
result silently, and what is kept on disk.  Faults are real wherever the real thing runs: CLI cases start
``python -m reflow_core`` as a subprocess, kills are SIGKILL, Ctrl-C is SIGINT, divergence comes from a real learning
rate that is far too high.  The README's "What happens when things go wrong" table lists the same cases.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from reflow_core import checkpoint as ckpt_io
from reflow_core.config import TrainConfig
from reflow_core.data import prepare
from reflow_core.errors import ERROR_PREFIX
from reflow_core.model import build_model
from reflow_core.divergence import TrainingDiverged
from reflow_core.train import ENV_PROGRESS, make_optimizer, train

REPO = Path(__file__).resolve().parent.parent
USER_ERROR_EXIT = 2


def tiny_config(data: Path, out: Path, **changes) -> TrainConfig:
    """reflow@test on a few KB (as tests/test_train.py): a step takes ~0.1 s on one thread."""
    base = dict(model="reflow@test", data_dir=str(data), out_dir=str(out), max_steps=6, micro_batch_size=4,
                lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_interval=0, eval_batches=2, ckpt_interval=0,
                log_interval=1, threads=1, progress=False)
    return TrainConfig(**{**base, **changes})


def cli(*args, cwd: Path = REPO, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m reflow_core ARGS`` in a real subprocess."""
    return subprocess.run([sys.executable, "-m", "reflow_core", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, ENV_PROGRESS: "lines", **(env or {})})


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, no traceback, and the message (on ``reflow_core: error:`` lines) names every needle."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == USER_ERROR_EXIT, output
    assert "Traceback" not in output, output
    message = " ".join(line[len(ERROR_PREFIX):] for line in proc.stderr.splitlines() if line.startswith(ERROR_PREFIX))
    assert message, output
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ======================================================================================================================
# 1. One run per output folder


def test_a_second_run_on_a_busy_out_dir_is_refused_and_the_lock_dies_with_its_holder(tiny_data, tmp_path):
    out = tmp_path / "run"
    first = tiny_config(tiny_data, out, max_steps=100_000, seed=1).to_json(tmp_path / "a.json")
    second = tiny_config(tiny_data, out, max_steps=3, seed=2).to_json(tmp_path / "b.json")
    a = subprocess.Popen([sys.executable, "-m", "reflow_core", "train", "--config", str(first)], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, ENV_PROGRESS: "lines"})
    try:
        deadline = time.time() + 120
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):
            assert a.poll() is None and time.time() < deadline, "run A did not start"
            time.sleep(0.2)
        b = cli("train", "--config", second)
        assert_user_error(b, f"PID {a.pid}", str(out))
        assert a.poll() is None  # A goes on undisturbed
        steps = [r["step"] for r in read_metrics(out)]
        assert steps == list(range(1, len(steps) + 1))  # one trajectory: B wrote no line
    finally:
        a.kill()
        a.wait()
    # the holder is gone, so its lock is stale: a new run takes the folder
    assert train(tiny_config(tiny_data, out, max_steps=2, resume="never"))["steps"] == 2


def test_checkpoint_cleanup_removes_only_dead_runs_temp_dirs(tmp_path):
    """A save in progress belongs to a live process: another process's cleanup must not delete it."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live = tmp_path / f"{ckpt_io.TMP_PREFIX}ckpt-7-pid{other.pid}"
        dead = tmp_path / f"{ckpt_io.TMP_PREFIX}ckpt-7-pid{dead_pid()}"
        for d in (live, dead):
            d.mkdir()
            (d / "model.safetensors").write_bytes(b"half written")
        model = build_model(TrainConfig(model="reflow@test").model_config())
        ckpt_io.save_checkpoint(tmp_path, model, step=1)
        assert live.is_dir() and not dead.exists()
    finally:
        other.kill()
        other.wait()


@pytest.mark.slow
def test_a_locked_out_dir_refuses_every_ddp_rank_without_hanging(tiny_data, tmp_path):
    from reflow_core.launch import launch_command
    from reflow_core.runlock import RunLock

    out = tmp_path / "run"
    config_path = tiny_config(tiny_data, out, max_steps=2, tokens_per_step=2 * 4 * 64).to_json(tmp_path / "c.json")
    with RunLock(out):  # this test process holds the folder, as a live run would
        proc = subprocess.run(launch_command(config_path, 2), cwd=REPO, capture_output=True, text=True, timeout=240,
                              env={**os.environ, ENV_PROGRESS: "lines"})
    assert proc.returncode != 0
    assert f"PID {os.getpid()}" in proc.stdout + proc.stderr
    assert not (out / "ckpt").exists()


# ======================================================================================================================
# 2. Divergence is caught before it is saved


def test_a_finite_loss_blow_up_stops_the_run_before_any_checkpoint(tiny_data, tmp_path):
    """lr=3 gives losses of ~1e3-1e4 that stay finite: the old check (non-finite only) trained on and exited 0."""
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as info:
        train(tiny_config(tiny_data, out, lr=3.0, min_lr=0.0, warmup_steps=0, ckpt_interval=1))
    message = str(info.value)
    assert info.value.step == 1 and info.value.checkpoint is None
    assert "ln V" in message and "no checkpoint was written" in message and "is none was written" not in message
    assert not (out / "ckpt").exists() and not (out / "summary.json").exists()


def test_exploding_weights_are_never_saved_or_called_good(tiny_data, tmp_path):
    """lr=1e6: after one update the loss looks like a fresh model's (≈ ln V) but the weights are ~1e6 and the
    gradient is 0 — the old code saved that dead model and named it "the last good checkpoint"."""
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as info:
        train(tiny_config(tiny_data, out, lr=1e6, min_lr=0.0, warmup_steps=0, grad_clip=0.0, ckpt_interval=1))
    assert info.value.checkpoint is None and "last good checkpoint is" not in str(info.value)
    assert not (out / "ckpt").exists()


def test_resuming_a_dead_model_stops_and_says_so(tiny_data, tmp_path):
    """A checkpoint that recorded a sane loss but holds a dead model (all weights 0: loss = ln V, gradient 0)."""
    out = tmp_path / "run"
    config = tiny_config(tiny_data, out, max_steps=2, ckpt_interval=2)
    train(config)
    state, opt_tensors, meta = ckpt_io.load_checkpoint(out)
    model = build_model(config.model_config())
    model.load_state_dict({k: torch.zeros_like(v) for k, v in state.items()})
    optimizer = make_optimizer(model, config, "cpu")
    ckpt_io.load_optimizer_state(optimizer, model, opt_tensors, meta)
    ckpt_io.save_checkpoint(out, model, optimizer, step=meta["step"], config=config, tokens_seen=meta["tokens_seen"],
                            extra=meta["extra"])
    before = ckpt_io.sha256_file(out / "ckpt" / "model.safetensors")
    (out / "summary.json").unlink()

    proc = cli("train", "--config", config.replace(max_steps=6).to_json(tmp_path / "resume.json"))
    message = assert_user_error(proc, "dead", str(out / "ckpt"))
    assert "last good checkpoint is" not in message
    assert ckpt_io.sha256_file(out / "ckpt" / "model.safetensors") == before and ckpt_io.read_meta(out)["step"] == 2
    assert not (out / "summary.json").exists()


def test_the_guard_trips_on_spikes_zero_gradients_and_dead_streaks_only():
    from reflow_core.divergence import DivergenceGuard

    guard = DivergenceGuard(vocab_size=50304, warmup_steps=5)
    assert guard.check(1, 10.9, 1.0) is None  # a fresh model: ln V, with a gradient
    for step in range(2, 40):
        assert guard.check(step, 4.0 + 0.01 * (step % 3), 0.5) is None
    assert guard.check(40, 7.5, 0.5) is None  # a bump, well under 3x the median
    assert "median" in guard.check(41, 13.0, 0.5)
    assert "ln V" in guard.check(41, 25.0, 0.5)
    assert "gradient" in guard.check(41, 4.0, 0.0)
    assert "nan" in guard.check(41, float("nan"), 0.5)
    assert guard.check(41, 4.0, 0.5) is None  # a trip does not poison the history

    early = DivergenceGuard(vocab_size=50304, warmup_steps=100)
    for step in range(1, 40):
        early.check(step, 4.0, 0.5)
    assert early.check(40, 13.0, 0.5) is None  # during warmup only the absolute ceiling applies

    dead = DivergenceGuard(vocab_size=50304, warmup_steps=0)
    assert [dead.check(s, 10.8258, 1e-9) for s in (11, 12)] == [None, None]
    assert "dead" in dead.check(13, 10.8258, 1e-9) and dead.first_bad_step == 11  # the evidence began at step 11


# ======================================================================================================================
# 3. A zero-step resume keeps the original totals


def test_a_zero_step_resume_reports_the_original_runs_throughput(tiny_data, tmp_path):
    """A crash after the last save but before summary.json: the rerun resumes 6 -> 6 and must not write nulls."""
    config = tiny_config(tiny_data, tmp_path / "run", max_steps=6)
    first = train(config)
    (tmp_path / "run" / "summary.json").unlink()
    again = train(config)
    assert again["steps_this_run"] == 0 and again["steps"] == 6
    assert again["tokens_per_s"] is not None and again["tokens_per_s"] == pytest.approx(first["tokens_per_s"])
    assert again["train_s"] == pytest.approx(first["train_s"]) and again["tokens"] == first["tokens"]
    assert round(again["tokens_per_s"]) > 0  # what chapter 02 does with it


# ======================================================================================================================
# 4. A failed chapter never replaces a good one


@pytest.mark.slow
def test_a_failing_chapter_keeps_the_good_copy_and_the_build_refuses_it(tmp_path, monkeypatch):
    from test_book import make_repo, write_notebook

    from reflow_core import book

    toc = "format: jb-book\nroot: book/intro\nchapters:\n  - file: notebooks/01_flaky\n"
    (tmp_path / "repo").mkdir()
    repo = make_repo(tmp_path / "repo", toc, {})
    source = 'import os\nassert os.environ.get("REFLOW_FAULT") != "1", "the chapter broke"\nprint("good run")\n'
    write_notebook(repo / "notebooks" / "01_flaky.ipynb", source=source)
    book.execute_notebooks("test", repo_root=repo, log_output=False)
    stored = repo / "results" / "test" / "notebooks" / "01_flaky.ipynb"
    good = stored.read_bytes()
    assert b"good run" in good

    monkeypatch.setenv("REFLOW_FAULT", "1")
    with pytest.raises(book.NotebookExecutionError) as info:
        book.execute_notebooks("test", repo_root=repo, log_output=False)
    failed = stored.with_name("01_flaky.failed.ipynb")
    assert stored.read_bytes() == good  # the good executed copy is still there, untouched
    assert failed.is_file() and b"the chapter broke" in failed.read_bytes()
    assert info.value.executed_path == failed and str(failed) in str(info.value)
    assert not list(stored.parent.glob(".*"))  # no temporary copy left behind

    with pytest.raises(book.BookError, match=r"(?s)failed in their last run.*01_flaky: AssertionError: the chapter "
                                             r"broke.*01_flaky\.failed\.ipynb.*--only 01_flaky"):
        book.stage_book("test", repo_root=repo, stage_dir=tmp_path / "stage")
    stage = book.stage_book("test", repo_root=repo, stage_dir=tmp_path / "stage", allow_failed=True)
    staged = (stage / "notebooks" / "01_flaky.ipynb").read_text()
    assert "the chapter broke" in staged and "good run" in staged  # marked, and showing the earlier good run

    monkeypatch.setenv("REFLOW_FAULT", "0")  # fixed: the next success replaces the copy and clears the failure
    book.execute_notebooks("test", repo_root=repo, log_output=False)
    assert not failed.exists()
    book.stage_book("test", repo_root=repo, stage_dir=tmp_path / "stage")


# ======================================================================================================================
# 5. Text that is not UTF-8


@pytest.mark.parametrize("content, offset", [
    (b"A first paragraph.\n\nCaf\xe9 au lait, in Latin-1.\n", 23),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 0),
])
def test_a_corpus_that_is_not_utf8_names_the_file_and_the_byte(tmp_path, content, offset):
    (tmp_path / "good.txt").write_text("Plain text.\n\nAnother paragraph.\n")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    proc = cli("prepare", "--source", f"local:{tmp_path}/*.txt", "--out", tmp_path / "out")
    assert_user_error(proc, str(bad), f"byte {offset}", "iconv")
    assert not (tmp_path / "out").exists()


# ======================================================================================================================
# 6. and 7. User errors are one-line messages with exit code 2, checked before any model is loaded


BLANK_TEXT = "\n\n  \n"  # a corpus file with no document in it


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _manifest_dir(root: Path, name: str, manifest) -> Path:
    d = root / name
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


@pytest.mark.parametrize("case", [
    "manifest-without-splits", "manifest-is-a-list", "empty-corpus", "unknown-source", "missing-config",
    "out-dir-is-a-file", "prepare-out-is-a-file", "sample-cuda-on-cpu", "sample-negative-max-new-tokens",
    "sample-negative-temperature", "openwebtext-offline",
])
def test_user_errors_are_one_line_messages_with_exit_code_2(case, tiny_data, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    no_ckpt = tmp_path / "no-such-run"  # the argument checks must come before the checkpoint is even looked at
    train = ["train", "--preset", "reflow@test", "--set", "max_steps=1", "--set", "warmup_steps=0",
             "--set", "threads=1"]
    cases = {
        "manifest-without-splits": lambda: (train + ["--data-dir", _manifest_dir(tmp_path, "d", {"format_version": 1}),
                                                     "--out-dir", tmp_path / "o"], ["splits", "prepare"]),
        "manifest-is-a-list": lambda: (train + ["--data-dir", _manifest_dir(tmp_path, "d", [1, 2]), "--out-dir",
                                                tmp_path / "o"], ["manifest.json", "prepare"]),
        "empty-corpus": lambda: (["prepare", "--source", "local:" + str(_write(tmp_path / "empty.txt", BLANK_TEXT)),
                                  "--out", tmp_path / "o"], ["empty.txt", "document"]),
        "unknown-source": lambda: (["prepare", "--source", "wikipedia", "--out", tmp_path / "o"],
                                   ["unknown source 'wikipedia'", "wiki-offline"]),
        "missing-config": lambda: (["train", "--config", tmp_path / "nope.json"], [str(tmp_path / "nope.json")]),
        "out-dir-is-a-file": lambda: (train + ["--data-dir", tiny_data, "--out-dir", a_file],
                                      [str(a_file), "not a directory"]),
        "prepare-out-is-a-file": lambda: (["prepare", "--source", "tiny", "--out", a_file],
                                          [str(a_file), "not a directory"]),
        "sample-cuda-on-cpu": lambda: (["sample", no_ckpt, "--device", "cuda"], ["cuda", "--device"]),
        "sample-negative-max-new-tokens": lambda: (["sample", no_ckpt, "--max-new-tokens", "-1"],
                                                   ["--max-new-tokens"]),
        "sample-negative-temperature": lambda: (["sample", no_ckpt, "--temperature", "-1"],
                                                ["--temperature", "greedy"]),
        "openwebtext-offline": lambda: (["prepare", "--source", "openwebtext", "--out", tmp_path / "o"],
                                        ["OpenWebText", "--openwebtext-path"]),
    }
    if case == "sample-cuda-on-cpu" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args, needles = cases[case]()
    assert_user_error(cli(*args, env={"HF_HUB_OFFLINE": "1"}), *needles)  # never the 54 GB download


def test_sample_refuses_a_negative_temperature_in_python_too():
    from reflow_core.errors import UserError
    from reflow_core.sample import sample

    torch.manual_seed(0)
    model = build_model(TrainConfig(model="reflow@test").model_config())
    with pytest.raises(UserError, match="temperature"):
        sample(model, "x", max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError):  # the builtin base stays, for existing `except ValueError` code
        sample(model, "x", max_new_tokens=-1)
    assert len(sample(model, "x", max_new_tokens=2, temperature=0.0)) == 1  # 0 is greedy, and allowed


# ======================================================================================================================
# 8. Killed preparations


def test_a_rerun_removes_the_folders_of_killed_preparations_and_says_how_much(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    paragraph = "The quick brown fox jumps over the lazy dog, again and again, in paragraph {}.\n\n"
    corpus.write_text("".join(paragraph.format(i) for i in range(60_000)))  # ~5 MB: several seconds of work
    out = tmp_path / "prepared"
    proc = subprocess.Popen([sys.executable, "-m", "reflow_core", "prepare", "--source", f"local:{corpus}", "--out",
                             str(out)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".prepared.preparing-*/hf-cache")):
        assert proc.poll() is None and time.time() < deadline, "the preparation did not start (or finished)"
        time.sleep(0.02)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    leftover = list(tmp_path.glob(".prepared.preparing-*"))
    assert len(leftover) == 1 and str(proc.pid) in leftover[0].name

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:  # a live preparation of the same target, and a dead one of another target, are not ours to remove
        live = tmp_path / f".prepared.preparing-{other.pid}-live"
        elsewhere = tmp_path / f".other.preparing-{dead_pid()}-x"
        live.mkdir()
        elsewhere.mkdir()
        capsys.readouterr()
        prepare("tiny", out)
        said = capsys.readouterr().out
        assert not leftover[0].exists() and live.is_dir() and elsewhere.is_dir()
        assert "removed 1 folder" in said and "MB" in said and str(proc.pid) in said
        assert (out / "manifest.json").is_file()
    finally:
        other.kill()
        other.wait()


# ======================================================================================================================
# 9. Ctrl-C during the book


@pytest.mark.slow
def test_ctrl_c_during_the_book_prints_one_line_and_leaves_no_process(tmp_path):
    from test_book import make_repo, write_notebook

    toc = "format: jb-book\nroot: book/intro\nchapters:\n  - file: notebooks/01_sleepy\n"
    (tmp_path / "repo").mkdir()
    repo = make_repo(tmp_path / "repo", toc, {})
    marker = tmp_path / "pids"
    source = (
        "import os, subprocess, sys, time\n"
        "helper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
        f"open({str(marker)!r}, 'w').write(f'{{os.getpid()}} {{helper.pid}}')\n"
        "time.sleep(300)\n"
    )
    write_notebook(repo / "notebooks" / "01_sleepy.ipynb", source=source)
    proc = subprocess.Popen([sys.executable, "-m", "reflow_core", "book", "--scale", "test", "--only", "01_sleepy"],
                            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # read both pipes as they fill: what is printed after the Ctrl-C is what this test is about (the kernel's
    # start-up chatter before it is not), and a leftover process holding the pipes must not hang the test
    out: list[str] = []
    err: list[str] = []
    for stream, lines in ((proc.stdout, out), (proc.stderr, err)):
        threading.Thread(target=lambda s=stream, l=lines: l.extend(s), daemon=True).start()
    pids: list[int] = []
    try:
        deadline = time.time() + 180
        while not (marker.is_file() and marker.read_text().count(" ") == 1):
            assert proc.poll() is None and time.time() < deadline, "the chapter did not start"
            time.sleep(0.2)
        pids = [int(p) for p in marker.read_text().split()]
        time.sleep(1.0)
        before = len(err)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 130, "".join(out + err)
        time.sleep(0.5)  # the last lines through the reader threads
        assert "Traceback" not in "".join(out + err), "".join(out + err)
        after = [line.strip() for line in err[before:] if line.strip()]
        assert len(after) == 1 and "01_sleepy" in after[0] and "interrupted" in after[0], after
        assert "checkpoints" in after[0]  # a rerun reuses what training stored
        assert not [p for p in pids if alive(p)], "the kernel or its child outlived the book"
        assert not (repo / "results" / "test" / "notebooks" / "01_sleepy.ipynb").exists()
        assert not list((repo / "results" / "test" / "notebooks").glob(".*"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)


def test_ctrl_c_during_training_prints_one_line_and_frees_the_folder(tiny_data, tmp_path):
    out = tmp_path / "run"
    config = tiny_config(tiny_data, out, max_steps=100_000, ckpt_interval=5).to_json(tmp_path / "c.json")
    # started with SIGINT ignored, as a background job of a non-interactive shell is (a CI runner's, say): the
    # command must still stop on SIGINT
    proc = subprocess.Popen([sys.executable, "-m", "reflow_core", "train", "--config", str(config)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, ENV_PROGRESS: "lines"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.time() + 120
        while not (out / "ckpt").is_dir():
            assert proc.poll() is None and time.time() < deadline, "the run did not reach its first checkpoint"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and "resumes from its last checkpoint" in lines[0], err
    saved = ckpt_io.read_meta(out)["step"]
    summary = train(tiny_config(tiny_data, out, max_steps=saved + 1, ckpt_interval=5))  # the folder is free again
    assert summary["resumed_from"] == saved and summary["steps"] == saved + 1


# ======================================================================================================================
# 10. Wording


def test_the_prepare_hint_names_the_source_of_the_missing_data(tmp_path):
    from reflow_core.data import DatasetNotPreparedError, load_tokens

    with pytest.raises(DatasetNotPreparedError) as info:
        load_tokens(tmp_path / "openwebtext", "train")
    assert "--source openwebtext" in str(info.value) and "--source wiki-offline" not in str(info.value)
    stale = _manifest_dir(tmp_path, "mine", {"format_version": 0, "source": "small-mix"})
    with pytest.raises(DatasetNotPreparedError, match="--source small-mix"):
        load_tokens(stale, "train")
    with pytest.raises(DatasetNotPreparedError) as info:
        load_tokens(tmp_path / "my-corpus", "train")  # nothing says which source: no guess
    assert "--source wiki-offline" not in str(info.value) and "--source <" in str(info.value)


def test_a_checkpoint_folder_without_meta_json_is_called_incomplete(tmp_path):
    model = build_model(TrainConfig(model="reflow@test").model_config())
    ckpt = ckpt_io.save_checkpoint(tmp_path / "run", model, step=1)
    (ckpt / ckpt_io.META_FILE).unlink()
    for path in (tmp_path / "run", ckpt):
        with pytest.raises(ckpt_io.CorruptCheckpointError, match="incomplete"):
            ckpt_io.read_meta(path)
    proc = cli("sample", ckpt, "--max-new-tokens", "1")
    message = assert_user_error(proc, "incomplete", str(ckpt))
    assert "no checkpoint at" not in message
