"""Host plumbing for the tests that mount things: run a command (failing the test with
its stderr), the mounts and the loop devices under a directory, polling."""

import subprocess
import time


def run(*args, check=True, env=None, timeout=600):
    """Runs a command; with `check`, a non-zero exit fails the test with its output."""
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({p.returncode}): {p.stderr}{p.stdout}")
    return p


def mounts_under(path):
    """Mountpoints at or below `path`."""
    path = str(path)
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(path)]


def is_mounted(path):
    """Whether `path` itself is a mountpoint."""
    return str(path) in mounts_under(path)


def loops_under(path):
    """Loop devices whose backing file lies under `path`, as `NAME BACK-FILE` lines."""
    out = run("losetup", "-l", "-n", "-O", "NAME,BACK-FILE", check=False).stdout
    return [l for l in out.splitlines() if str(path) in l]


def loop_devices_under(path):
    """The device names of loops_under(path)."""
    return [l.split()[0] for l in loops_under(path)]


def wait_until(what, pred, timeout=20):
    """Polls `pred` until true; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
