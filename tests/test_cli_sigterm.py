"""SIGTERM to a `pipeline` command stops the processes it started (cli.exit_on_sigterm): before, Python died at
once and SPICE's java, run by `score`, went on at full CPU."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:            # a zombie is dead, only not yet reaped
        return f.read().split(") ")[1][0] != "Z"


def test_sigterm_exits_143_and_stops_the_child_process(tmp_path):
    pidfile = tmp_path / "child.pid"
    child = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    script = textwrap.dedent(f"""
        import subprocess, sys
        from pipeline.cli import exit_on_sigterm
        exit_on_sigterm()
        subprocess.run([sys.executable, "-c", {child!r}])    # as SPICE's java is run
    """)
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not (pidfile.exists() and pidfile.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 143
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    try:
        assert not _alive(pid), "the child outlived the command"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_decoding_workers_die_on_sigterm_whatever_the_parent_does():
    """decode_features' forked workers take SIGTERM's default action: Pool.terminate stops them with SIGTERM, and
    one that inherited exit_on_sigterm's handler could raise SystemExit holding the task queue's lock (`score`
    hung at the end of the split, its other worker waiting on that lock)."""
    import multiprocessing as mp
    from pipeline.cli import exit_on_sigterm
    from pipeline.decoder.decode import _worker_init
    before = signal.getsignal(signal.SIGTERM)
    try:
        exit_on_sigterm()
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        with mp.get_context("fork").Pool(1, _worker_init, (1,)) as pool:
            assert pool.apply(signal.getsignal, (signal.SIGTERM,)) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_an_interrupted_meteor_is_stopped_and_its_lock_freed():
    """pycocoevalcap's Meteor keeps its lock when an exception (SIGTERM's SystemExit, Ctrl-C) ends a score midway;
    its __del__ then waited on the lock forever and its java ran on. score.stop_meteor ends both."""
    import threading
    from pipeline.inference.score import java_available, stop_meteor
    if not java_available():
        pytest.skip("no java: METEOR does not run (apt-get install default-jre-headless)")
    from pycocoevalcap.meteor.meteor import Meteor
    m = Meteor()
    proc = m.meteor_p
    m.lock.acquire()                           # as _score leaves it when interrupted between acquire and release
    stop_meteor(m)
    assert proc.poll() is not None, "METEOR's java still runs"
    done = threading.Event()
    threading.Thread(target=lambda: (m.__del__(), done.set()), daemon=True).start()
    assert done.wait(10), "Meteor.__del__ still waits on the lock"
