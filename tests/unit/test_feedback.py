"""What a run shows (cryospin.train.feedback) and keeps (cryospin.train.runlog): progress lines
at the interval of an injected clock, the choice of bar / lines / nothing, log records above a
bar instead of on its line, and run.log (timestamped, appended, one header per invocation,
held until the run is accepted, removed after, nested use, the reason a run stopped, a failing
disk)."""

from __future__ import annotations

import errno
import logging
import os
import re
import sys

import pytest

from cryospin.errors import InputError, OutputError
from cryospin.train import feedback as feedback_module
from cryospin.train.feedback import BAR, LINES, OFF, Feedback, PassProgress
from cryospin.train.progress import RunEstimate
from cryospin.train.runlog import RUN_LOG, header_line, note, run_log, start_run_log

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
log = logging.getLogger("cryospin.test_feedback")


class Clock:
    """A clock the test sets."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(feedback_module, "monotonic", c)
    return c


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cryospin.train.feedback"]


# ----------------------------------------------------------------------------- progress


def test_a_line_every_interval_with_the_pass_and_run_eta(clock, caplog):
    caplog.set_level(logging.INFO, logger="cryospin.train.feedback")
    progress = PassProgress("epoch 1/2 (stage 1)", 100, display=LINES, interval_s=10,
                            what="epoch",
                            run_eta=lambda done, seconds: RunEstimate(99.0 + done))
    for t in (105, 110, 115, 121):
        clock.now = t
        progress.update(20, loss=1.5)
    progress.close()
    # a line at 10 s (40 images, 4/s, 60 left: 15 s) and at 21 s (11 s after it; 80 images,
    # 3.8/s, 20 left: 5 s); none at 5 s and 15 s
    assert _messages(caplog) == [
        "epoch 1/2 (stage 1): 40/100 images (40 %), 4.0 images/s, ETA epoch 15 s, run 2 min 19 s",
        "epoch 1/2 (stage 1): 80/100 images (80 %), 3.8 images/s, ETA epoch 5 s, run 2 min 59 s",
    ]


def test_no_lines_when_off_or_interval_zero(clock, caplog):
    caplog.set_level(logging.INFO, logger="cryospin.train.feedback")
    for progress in (PassProgress("a", 10, display=OFF, interval_s=1),
                     PassProgress("b", 10, display=LINES, interval_s=0)):
        clock.now += 50
        progress.update(5)
    assert _messages(caplog) == []


def test_scale_counts_every_rank_images(clock, caplog):
    caplog.set_level(logging.INFO, logger="cryospin.train.feedback")
    progress = Feedback(LINES, 1.0).start("switch: inference pass", 64, scale=2.0)
    clock.now += 2
    progress.update(16)  # rank 0's 16 of its 32: 32 of all 64
    assert progress.done == 32
    assert _messages(caplog) == ["switch: inference pass: 32/64 images (50 %), 16.0 images/s, "
                                 "ETA pass 2 s"]


def test_choice_of_display(monkeypatch):
    monkeypatch.setattr(feedback_module, "stderr_is_terminal", lambda: True)
    assert Feedback.choose(main=True, bar=True, interval_s=30).display == BAR
    assert Feedback.choose(main=True, bar=False, interval_s=30).display == LINES  # --no-progress
    assert Feedback.choose(main=True, bar=False, interval_s=0).display == OFF
    assert Feedback.choose(main=False, bar=True, interval_s=30).display == OFF  # rank > 0
    monkeypatch.setattr(feedback_module, "stderr_is_terminal", lambda: False)  # nohup, sbatch
    assert Feedback.choose(main=True, bar=True, interval_s=30) == Feedback(LINES, 30)
    assert Feedback.choose(main=True, bar=True, interval_s=0).display == OFF


def test_bar_shows_the_run_eta_and_log_records_go_above_it(clock, capsys):
    """With a bar on screen, a log record is written on a line of its own (the bar cleared
    first), not glued to the bar's text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        feedback = Feedback(BAR, 30.0)
        with feedback.console():
            assert handler not in root.handlers  # replaced by one writing through tqdm
            progress = feedback.start("epoch 1/3 (stage 1)", 64, what="epoch",
                                      run_eta=lambda done, seconds: RunEstimate(
                                          125.0, 65.0, 4))
            clock.now += 1
            progress.update(32, loss=0.5)
            progress.bar.refresh()
            log.info("switch to auto-decoding")
            progress.close()
        assert handler in root.handlers
    finally:
        root.removeHandler(handler)
        log.setLevel(level)
    err = capsys.readouterr().err
    assert "epoch 1/3 (stage 1)" in err
    assert "run ETA=2 min 05 s (1 min 05 s if the search stops after epoch 4)" in err
    line = next(x for x in err.split("\n") if "switch to auto-decoding" in x)
    assert line.split("\r")[-1].strip() == "INFO switch to auto-decoding"


# ----------------------------------------------------------------------------- run.log


def _run_log_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if type(h).__name__ == "_RunLogHandler"]


def test_run_log_appends_timestamped_records_and_is_removed_after(tmp_path):
    path = tmp_path / RUN_LOG
    package_level = logging.getLogger("cryospin").level
    with run_log(path, header=header_line(["cryospin", "reconstruct", "p.star", "-o", "r"],
                                          resumed=False)):
        log.info("preprocessing 32 particles")  # held until the run is accepted
        start_run_log(path)
        log.info("epoch 1/3 autoencode: loss 1")
        note("done: 3 epochs")
        logging.getLogger("cryospin.x").debug("not at INFO")
    assert not _run_log_handlers() and logging.getLogger("cryospin").level == package_level
    log.warning("after the run: not in the file")
    note("nor this")
    with run_log(path, header=header_line(["cryospin", "reconstruct", "--resume", "my run"],
                                          resumed=True)):
        start_run_log(path)
        log.info("epoch 2/3 autodecode: loss 0.5")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert all(re.match(STAMP + " ", line) for line in lines)
    assert [line[20:] for line in lines] == [
        "INFO ==== started: cryospin reconstruct p.star -o r ====",
        "INFO preprocessing 32 particles",
        "INFO epoch 1/3 autoencode: loss 1",
        "INFO done: 3 epochs",
        "INFO ==== resumed: cryospin reconstruct --resume 'my run' ====",
        "INFO epoch 2/3 autodecode: loss 0.5",
    ]
    assert header_line(None, resumed=False) == "==== started: (in-process call) ===="


def test_nested_run_logs_of_one_file_write_once(tmp_path):
    with run_log(tmp_path / RUN_LOG, header="==== outer ===="):
        with run_log(str(tmp_path / "." / RUN_LOG), header="==== inner ===="):
            start_run_log(tmp_path / RUN_LOG)  # the trainer inside the command line
            log.info("once")
            with run_log(tmp_path / "half_A.log"):  # another file: both get the record
                start_run_log(tmp_path / "half_A.log")
                log.info("twice")
    assert [line[20:] for line in (tmp_path / RUN_LOG).read_text().splitlines()] == [
        "INFO ==== outer ====", "INFO once", "INFO twice"]
    assert [line[20:] for line in (tmp_path / "half_A.log").read_text().splitlines()] == [
        "INFO twice"]


def test_a_line_cut_by_a_kill_is_ended_before_the_next_invocation(tmp_path):
    path = tmp_path / RUN_LOG
    path.write_bytes(b"2026-01-01 00:00:00 INFO epoch 1/3 autoenc")
    with run_log(path, header="==== resumed: x ===="):
        start_run_log(path)
    lines = path.read_text().splitlines()
    assert lines[0] == "2026-01-01 00:00:00 INFO epoch 1/3 autoenc"
    assert lines[1].endswith("INFO ==== resumed: x ====")


def test_the_reason_a_run_stopped_is_recorded(tmp_path):
    path = tmp_path / RUN_LOG
    with pytest.raises(InputError), run_log(path):
        start_run_log(path)
        raise InputError("bad pixel size", "particles.star")
    with pytest.raises(KeyboardInterrupt), run_log(path):
        start_run_log(path)
        raise KeyboardInterrupt("interrupted; continue with: cryospin reconstruct --resume r")
    with pytest.raises(RuntimeError), run_log(path):
        start_run_log(path)
        raise RuntimeError("a bug")
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0].endswith("WARNING ==== stopped: particles.star: bad pixel size ====")
    assert lines[1].endswith("WARNING ==== stopped: interrupted; continue with: cryospin "
                             "reconstruct --resume r ====")
    assert lines[2].endswith("ERROR ==== stopped by RuntimeError: a bug ====")
    assert "Traceback" in text and 'raise RuntimeError("a bug")' in text
    assert not _run_log_handlers()


def test_a_failing_disk_is_said_once_and_the_run_goes_on(tmp_path, capsys):
    class Full:
        def write(self, text: str) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self) -> None: ...

        def close(self) -> None: ...

    with run_log(tmp_path / RUN_LOG):
        start_run_log(tmp_path / RUN_LOG)
        (handler,) = _run_log_handlers()
        real = handler.stream
        handler.stream = Full()
        log.info("one")
        log.info("two")
        note("three")
        handler.stream = real
    err = capsys.readouterr().err
    assert err.count("cannot append to the run log") == 1
    assert "No space left on device" in err and "Traceback" not in err


def test_an_unwritable_run_log_is_an_output_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write the run log"):
        with run_log(blocker / RUN_LOG):
            start_run_log(blocker / RUN_LOG)
    assert not _run_log_handlers()


def test_a_run_refused_before_it_is_accepted_writes_nothing(tmp_path):
    """--resume with other particles, a 3D map as particles: refused before the trainer
    accepts the run, so the folder is left exactly as it was."""
    path = tmp_path / RUN_LOG
    with pytest.raises(InputError), run_log(path, header="==== resumed: x ===="):
        log.warning("contrast check: dark particles")
        note("never written")
        raise InputError("these are not the particles the run started with")
    assert not path.exists() and not _run_log_handlers()
    start_run_log(path)  # nothing attached: nothing to do
    assert not path.exists()
