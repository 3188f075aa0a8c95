"""What fio runs against. Each target exposes `path` (the file fio opens) and `close()`;
the caller registers `close` on the cleanup stack right after construction."""
import json
import os
import subprocess

from .util import is_mounted, rss_kib, sh, wait_for


class RawFile:
    """The backing file on the host filesystem: the ceiling for everything above it."""

    def __init__(self, workdir, name, size_bytes):
        self.path = os.path.join(workdir, name + ".raw")
        with open(self.path, "wb") as f:
            f.truncate(size_bytes)

    def server_pid(self):
        return None  # no server: fio reaches the host file system directly

    def close(self):
        if os.path.exists(self.path):
            os.unlink(self.path)


class SealvolVolume:
    """A sealvol volume file attached through the FUSE agent (`MNT/disk`)."""

    def __init__(self, sealvol, workdir, name, size_gib, encrypted, threads=4, metrics=False, cache=None,
                 env=None):
        self.sealvol, self.encrypted, self.cache = sealvol, encrypted, cache
        # metrics: the agent counts every request and serves Prometheus metrics on a free
        # loopback port (SEALVOL_METRICS_LISTEN), to measure what counting costs.
        # env: extra agent environment (SEALVOL_BACKING_IO, SEALVOL_FUSE_TRANSPORT).
        self.env = dict(os.environ, SEALVOL_METRICS_LISTEN="127.0.0.1:0",
                        SEALVOL_METRICS_SD_DIR=os.path.join(workdir, name + ".sd")) if metrics else None
        if env:
            self.env = dict(self.env or os.environ, **env)
        self.mnt = os.path.join(workdir, name + ".mnt")
        self.vol = os.path.join(workdir, name + ".vol")
        self.key = os.path.join(workdir, name + ".key")
        os.makedirs(self.mnt, exist_ok=True)
        create = [sealvol, "create-volume", "--force", "--path", self.vol, "--size-gib", size_gib]
        if encrypted:
            with open(self.key, "wb") as f:
                f.write(os.urandom(64))
            create += ["--volume-key-file", self.key]
        else:
            create.append("--unencrypted")
        sh(*create)
        self.path = os.path.join(self.mnt, "disk")
        self.threads = None
        self.attach(threads)

    def attach(self, threads):
        cmd = [self.sealvol, "attach", "--path", self.vol, "--mountpoint", self.mnt, "--threads", threads]
        cmd += ["--volume-key-file", self.key] if self.encrypted else ["--unencrypted"]
        if self.cache:
            cmd += ["--cache", self.cache]
        sh(*cmd, env=self.env)
        wait_for(lambda: is_mounted(self.mnt), f"FUSE mount at {self.mnt}", timeout=20)
        self.threads = threads

    def metrics_addr(self):
        """The agent's metrics address (from the target file it publishes), if it serves any."""
        if not self.env:
            return None
        sd = self.env["SEALVOL_METRICS_SD_DIR"]
        for f in os.listdir(sd) if os.path.isdir(sd) else []:
            with open(os.path.join(sd, f)) as fh:
                return json.load(fh)[0]["targets"][0]
        return None

    def detach(self):
        if is_mounted(self.mnt):
            subprocess.run([self.sealvol, "detach", "--mountpoint", self.mnt], capture_output=True)
        if is_mounted(self.mnt):
            subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        self.threads = None

    def agent_pid(self):
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
            except OSError:
                continue
            if b"attach" in cmd and self.mnt.encode() in cmd:
                return int(pid)
        return None

    def server_pid(self):
        return self.agent_pid()

    def agent_rss_kib(self):
        pid = self.agent_pid()
        return rss_kib(pid) if pid else None

    def backing_allocated_bytes(self):
        return os.stat(self.vol).st_blocks * 512

    def close(self):
        self.detach()
        for p in (self.vol, self.key):
            if os.path.exists(p):
                os.unlink(p)


class QsdLuks:
    """The peer: `qemu-storage-daemon` exporting a LUKS image (aes-xts-plain64, 512-bit
    key) over FUSE as a writable regular file. qemu's LUKS driver opens LUKS1 only
    ("LUKS version 2 is not supported" in qemu 10.0), so the image is LUKS1 made by
    `qemu-img create -f luks`; the data path is the same XTS-AES-256 cipher.

    direct=True is qemu's `cache=none` (`cache.direct=on` on the file node: O_DIRECT on the
    image), the peer of our `--cache none`; False is its default (writeback through the
    host page cache), the peer of our `--cache writeback`."""

    def __init__(self, workdir, name, size_bytes, direct=False):
        self.img = os.path.join(workdir, name + ".luks")
        self.path = os.path.join(workdir, name + ".export")
        self.secret = os.path.join(workdir, name + ".pass")
        self.pidfile = os.path.join(workdir, name + ".pid")
        self.log = os.path.join(workdir, name + ".log")
        with open(self.secret, "w") as f:
            f.write(os.urandom(24).hex())
        sec = f"secret,id=sec0,file={self.secret}"
        sh("qemu-img", "create", "-q", "-f", "luks", "--object", sec,
           "-o", "key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256,iter-time=10",
           self.img, str(size_bytes))
        open(self.path, "w").close()
        self.proc = subprocess.Popen(
            ["qemu-storage-daemon", "--object", sec,
             "--blockdev", f"driver=file,node-name=file0,filename={self.img}"
             + (",cache.direct=on" if direct else ""),
             "--blockdev", "driver=luks,node-name=luks0,file=file0,key-secret=sec0",
             "--export", f"type=fuse,id=exp0,node-name=luks0,mountpoint={self.path},writable=on",
             "--pidfile", self.pidfile],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: is_mounted(self.path) or self.proc.poll() is not None, "qemu-storage-daemon export")
            if not is_mounted(self.path):
                raise RuntimeError("qemu-storage-daemon failed: " + open(self.log).read())
        except BaseException:
            self.close()
            raise

    def rss_kib(self):
        return rss_kib(self.proc.pid)

    def server_pid(self):
        return self.proc.pid

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if is_mounted(self.path):
            subprocess.run(["umount", "-l", self.path], capture_output=True)
        for p in (self.img, self.path, self.secret, self.pidfile):
            if os.path.exists(p):
                os.unlink(p)


class LoopExt4:
    """A loop device over another target's file, formatted ext4 and mounted; fio then
    runs on a regular file inside that filesystem (the WorkSpaces path)."""

    def __init__(self, under, workdir, name):
        self.under = under
        self.mnt = os.path.join(workdir, name + ".ext4")
        os.makedirs(self.mnt, exist_ok=True)
        # --direct-io=on, as the WorkSpaces agent attaches volumes (src/controller/agent.rs).
        self.dev = sh("losetup", "--find", "--show", "--direct-io=on", under.path).strip()
        try:
            sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", self.dev)
            sh("mount", self.dev, self.mnt)
        except BaseException:
            self.close()
            raise
        self.path = os.path.join(self.mnt, "fio.dat")

    def server_pid(self):
        return self.under.server_pid()

    def close(self):
        if is_mounted(self.mnt):
            subprocess.run(["umount", self.mnt], capture_output=True)
        if is_mounted(self.mnt):
            subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        if self.dev:
            subprocess.run(["losetup", "-d", self.dev], capture_output=True)
            self.dev = None
