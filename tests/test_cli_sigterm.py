"""SIGTERM to a `pipeline` command stops the processes it started (cli.exit_on_sigterm): before, Python died at
once and SPICE's java, run by `score`, went on at full CPU."""
import os
import signal
import subprocess
import sys
import textwrap
import time


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
