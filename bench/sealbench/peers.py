"""The non-fio figures, each against its yardstick: cipher vs `openssl speed`, kms-daemon
vs moto_server (same SigV4 client, kms-load), rekey vs `cryptsetup reencrypt`."""
import json
import os
import re
import subprocess
import time

from .util import free_port, rotated, sh, summary, wait_for


# --- cipher --------------------------------------------------------------------------

def openssl_xts(seconds, nbytes, multi=1, elapsed=True):
    """`openssl speed -evp aes-256-xts -bytes N` in MB/s (its 'k' is 1000 bytes/s).

    openssl divides by CPU user time unless `-elapsed` is given; `sealvol bench` divides
    by wall-clock time, so the like-for-like yardstick is `-elapsed` (on a loaded machine
    the CPU-time figure is inflated by however much the process was descheduled)."""
    args = ["openssl", "speed", *(["-elapsed"] if elapsed else []), "-evp", "aes-256-xts", "-bytes", nbytes,
            "-seconds", max(1, round(seconds))]
    if multi > 1:
        args += ["-multi", multi]
    out = sh(*args)
    for line in reversed(out.splitlines()):
        m = re.search(r"(\d+(?:\.\d+)?)k\s*$", line)
        if m and "xts" in line.lower():
            return float(m.group(1)) * 1000 / 1e6
    raise RuntimeError("cannot parse openssl speed output:\n" + out)


def cipher(sealvol, reps, seconds, log):
    """Interleaved repetitions of `sealvol bench --output json` and openssl at 4096 and
    512 bytes, single core and all cores (`-multi`)."""
    cores = os.cpu_count() or 1
    runs = {}
    contenders = [
        ("openssl-4096-1t", lambda: {"openssl-4096-1t": openssl_xts(seconds, 4096)}),
        ("openssl-4096-1t-cputime", lambda: {"openssl-4096-1t-cputime": openssl_xts(seconds, 4096, elapsed=False)}),
        ("openssl-512-1t", lambda: {"openssl-512-1t": openssl_xts(seconds, 512)}),
        (f"openssl-4096-{cores}t", lambda: {f"openssl-4096-{cores}t": openssl_xts(seconds, 4096, cores)}),
        ("sealvol", lambda: {f"sealvol-{f['sector_size']}-{f['threads']}t-{f['op']}": f["mb_per_s"]
                             for f in json.loads(sh(sealvol, "bench", "--seconds", seconds, "--output", "json"))}),
    ]
    for rep in range(reps):
        for _, fn in rotated(contenders, rep):
            for k, v in fn().items():
                runs.setdefault(k, []).append(v)
    res = {k: summary(v) for k, v in sorted(runs.items())}
    log(f"cipher 4 KiB 1 core: sealvol {res['sealvol-4096-1t-encrypt']['median']:.0f} MB/s encrypt, "
        f"{res['sealvol-4096-1t-decrypt']['median']:.0f} decrypt; openssl {res['openssl-4096-1t']['median']:.0f} MB/s")
    return res


# --- KMS -----------------------------------------------------------------------------

def kms(kms_daemon, kms_load, moto_server, workdir, cleanup, reps, duration, warmup, log):
    """Decrypt req/s and p99 at 1 and 16 clients: kms-daemon (durable audit log on)
    and moto_server, the same kms-load client, servers alive side by side."""
    state = os.path.join(workdir, "kms-state")
    ready = os.path.join(workdir, "kms.ready")
    kd = subprocess.Popen([kms_daemon, "--state-dir", state, "--listen", "127.0.0.1:0", "--ready-file", ready],
                          stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, "kms.log"), "w"))
    cleanup.callback(_stop, kd)
    port = free_port()
    moto = subprocess.Popen([moto_server, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, "moto.log"), "w"))
    cleanup.callback(_stop, moto)

    def moto_up():
        try:
            import urllib.request
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return True
        except Exception:
            return False

    wait_for(lambda: os.path.exists(ready) and os.path.getsize(ready) > 0, "kms-daemon ready file")
    wait_for(moto_up, "moto_server", timeout=60, step=0.2)
    common = ["--op", "decrypt", "--clients", "1,16", "--duration", duration, "--warmup", warmup, "--output", "json"]
    contenders = [("kms-daemon", [kms_load, "--state-dir", state]),
                  ("moto_server", [kms_load, "--endpoint", f"http://127.0.0.1:{port}"])]
    runs = {}
    for rep in range(reps):
        for name, cmd in rotated(contenders, rep):
            for r in json.loads(sh(*cmd, *common, timeout=120))["runs"]:
                for m in ("requests_per_second", "p50_ms", "p99_ms", "errors", "reconnects"):
                    runs.setdefault(f"{name}|{r['clients']}|{m}", []).append(r[m])
    res = {k: summary(v) for k, v in runs.items()}
    for c in (1, 16):
        log(f"KMS Decrypt {c:2d} clients: kms-daemon {res[f'kms-daemon|{c}|requests_per_second']['median']:.0f} req/s "
            f"(p99 {res[f'kms-daemon|{c}|p99_ms']['median']:.1f} ms), moto_server "
            f"{res[f'moto_server|{c}|requests_per_second']['median']:.0f} req/s")
    _stop(kd)
    _stop(moto)
    try:
        import importlib.metadata
        res["moto_version"] = importlib.metadata.version("moto")
    except Exception:
        res["moto_version"] = "?"
    return res


def _stop(p):
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# --- rekey ---------------------------------------------------------------------------
# The logic of bench/rekey.sh, repeated and interleaved: both data areas filled with
# random bytes first so every sector is real work; sealvol `rekey-volume --offline`
# (journaled hotzones) vs `cryptsetup reencrypt --force-offline-reencrypt --resilience
# checksum` on a same-size LUKS2 image (aes-xts-plain64, 4096-byte sectors).

DATA_OFF = 16 << 20


def _fill_random(path, offset, nbytes):
    chunk = 8 << 20
    with open(path, "r+b") as f:
        f.seek(offset)
        left = nbytes
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def _rekey_sealvol(sealvol, d, size_gib, resilience="journal"):
    img, old, new = (os.path.join(d, n) for n in ("sv.luks", "old.key", "new.key"))
    for k in (old, new):
        with open(k, "wb") as f:
            f.write(os.urandom(64))
    sh(sealvol, "create-volume", "--force", "--path", img, "--size-gib", size_gib, "--volume-key-file", old)
    _fill_random(img, DATA_OFF, size_gib << 30)
    t0 = time.monotonic()
    sh(sealvol, "rekey-volume", "--path", img, "--volume-key-file", old, "--new-volume-key-file", new,
       "--offline", "--resilience", resilience, "--output", "json")
    dt = time.monotonic() - t0
    os.unlink(img)
    return (size_gib << 30) / dt / 1e6


def _rekey_cryptsetup(d, size_gib):
    img, pw = os.path.join(d, "cs.img"), os.path.join(d, "pass.key")
    with open(pw, "wb") as f:
        f.write(os.urandom(32))
    with open(img, "wb") as f:
        f.truncate((size_gib << 30) + DATA_OFF)
    kdf = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", pw]
    sh("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--cipher", "aes-xts-plain64",
       "--key-size", "512", "--sector-size", "4096", *kdf, img)
    _fill_random(img, DATA_OFF, size_gib << 30)
    t0 = time.monotonic()
    sh("cryptsetup", "reencrypt", "--batch-mode", "--force-offline-reencrypt", "--resilience", "checksum", *kdf, img)
    dt = time.monotonic() - t0
    os.unlink(img)
    return (size_gib << 30) / dt / 1e6


def rekey(sealvol, workdir, reps, size_gib, log):
    d = os.path.join(workdir, "rekey")
    os.makedirs(d, exist_ok=True)
    contenders = [("sealvol", lambda: _rekey_sealvol(sealvol, d, size_gib)),
                  ("sealvol_checksum", lambda: _rekey_sealvol(sealvol, d, size_gib, "checksum")),
                  ("cryptsetup", lambda: _rekey_cryptsetup(d, size_gib))]
    runs = {}
    for rep in range(reps):
        for name, fn in rotated(contenders, rep):
            runs.setdefault(name, []).append(fn())
    res = {f"{k}_mb_per_s": summary(v) for k, v in runs.items()}
    res["size_gib"] = size_gib
    log(f"rekey {size_gib} GiB: sealvol journal {res['sealvol_mb_per_s']['median']:.0f} MB/s, "
        f"checksum {res['sealvol_checksum_mb_per_s']['median']:.0f} MB/s, "
        f"cryptsetup reencrypt {res['cryptsetup_mb_per_s']['median']:.0f} MB/s")
    res["online"] = rekey_online(sealvol, workdir, reps, size_gib, log)
    return res


def rekey_online(sealvol, workdir, reps, size_gib, log):
    """bench/rekey-online.sh: foreground fio 4 KiB randrw QD16 IOPS during an online rekey
    vs alone, and the longest single I/O; `reps` runs, each field summarized."""
    script = os.path.join(os.path.dirname(__file__), "..", "rekey-online.sh")
    env = dict(os.environ, SEALVOL_BIN=str(sealvol), BENCH_DIR=workdir)
    runs = [json.loads(sh(script, "--size-gib", size_gib, "--output", "json", env=env, timeout=300))
            for _ in range(reps)]
    out = {k: summary([r[k] for r in runs]) for k in runs[0] if k not in ("size_gib", "hotzone_mib")}
    out["size_gib"], out["hotzone_mib"] = runs[0]["size_gib"], runs[0]["hotzone_mib"]
    log(f"online rekey {size_gib} GiB: {out['rekey_mb_per_s']['median']:.0f} MB/s, foreground IOPS "
        f"{out['during_iops_median']['median']:.0f} vs {out['base_iops_median']['median']:.0f} alone "
        f"({out['ratio']['median']:.2f}x), longest I/O {out['during_max_latency_ms']['median']:.1f} ms")
    return out
