"""Garage, an S3-compatible distributed object store, run on loopback for the snapshot
store tests: one node (replication 1) or three (replication 3, one zone each), each node
with its own config, metadata and data in a temporary directory and ports chosen free.
The harness assigns and applies the layout, imports an access key, creates a bucket and
allows the key on it.

    with Garage(nodes=3) as g:
        env = g.write_aws_profile(state_dir, "garage")   # AWS_CONFIG_FILE, ...
        g.client().put_object(Bucket=g.bucket, Key="k", Body=b"v")
        g.kill(1)                                          # SIGKILL one node

The binary is `garage` on PATH or ~/.cargo/bin/garage (scripts/setup installs it); when it
is missing the test skips, or fails under CI=true."""

import configparser
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import boto3
from botocore.config import Config

from sealvol_testing.ci import skip_or_fail

REGION = "garage"


def garage_binary():
    """The garage binary, or None when it is not installed."""
    found = shutil.which("garage")
    if found:
        return Path(found)
    home = Path.home() / ".cargo" / "bin" / "garage"
    return home if home.is_file() else None


def require_garage():
    """The garage binary; skips (fails under CI=true) when it is missing."""
    binary = garage_binary()
    if binary is None:
        skip_or_fail("garage not installed: run scripts/setup")
    return binary


def free_port():
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _poll(attempt, what, timeout=60.0):
    """Calls `attempt` until it returns without raising, or raises its last error with
    `what` once the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return attempt()
        except Exception as e:  # noqa: BLE001 - the last one is re-raised
            if time.monotonic() > deadline:
                raise TimeoutError(f"garage: timed out waiting for {what}: {e}") from e
            time.sleep(0.1)


class _Node:
    """One garage server process and its config."""

    def __init__(self, binary, root: Path, index, replication, rpc_secret):
        self.binary = binary
        self.dir = root / f"node{index}"
        self.dir.mkdir(parents=True)
        self.rpc_port, self.s3_port, self.admin_port = free_port(), free_port(), free_port()
        self.config = self.dir / "garage.toml"
        self.config.write_text(
            f'metadata_dir = "{self.dir / "meta"}"\n'
            f'data_dir = "{self.dir / "data"}"\n'
            'db_engine = "sqlite"\n'
            f"replication_factor = {replication}\n"
            f'rpc_bind_addr = "127.0.0.1:{self.rpc_port}"\n'
            f'rpc_public_addr = "127.0.0.1:{self.rpc_port}"\n'
            f'rpc_secret = "{rpc_secret}"\n'
            "\n[s3_api]\n"
            f's3_region = "{REGION}"\n'
            f'api_bind_addr = "127.0.0.1:{self.s3_port}"\n'
            'root_domain = ".s3.garage.localhost"\n'
            "\n[admin]\n"
            f'api_bind_addr = "127.0.0.1:{self.admin_port}"\n'
        )
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.log_path = self.dir / "garage.log"
        self.proc = None
        self.node_id = None

    def start(self):
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [str(self.binary), "-c", str(self.config), "server"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env={**os.environ, "RUST_LOG": "warn"},
            )
        finally:
            log.close()

    def cli(self, *args):
        """Runs `garage -c CONFIG args` against this node; raises with its output on failure."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"garage node exited with {self.proc.returncode}:\n{self.log()}")
        p = subprocess.run(
            [str(self.binary), "-c", str(self.config), *args],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "RUST_LOG": "warn"},
        )
        if p.returncode != 0:
            raise RuntimeError(f"garage {' '.join(args)} failed: {p.stderr}{p.stdout}")
        return p.stdout

    def wait_started(self):
        full = _poll(lambda: self.cli("node", "id", "-q").strip(), "a node to start")
        self.node_id = full.split("@", 1)[0]
        return full

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


class Garage:
    """A Garage cluster of `nodes` (1 or 3) on loopback; a context manager.

    After start: `endpoint` (S3 API of node 0), `endpoints` (every node's), `access_key`,
    `secret_key`, `bucket`, `region`."""

    def __init__(self, nodes=1, bucket="snapshots", tmp_dir=None):
        if nodes not in (1, 3):
            raise ValueError("Garage runs 1 node (replication 1) or 3 nodes (replication 3)")
        self.binary = require_garage()
        self.nodes_wanted = nodes
        self.bucket = bucket
        self.region = REGION
        self.access_key = "GK" + secrets.token_hex(12)
        self.secret_key = secrets.token_hex(32)
        self._own_tmp = tmp_dir is None
        self.root = Path(tmp_dir) if tmp_dir else Path(tempfile.mkdtemp(prefix="garage-"))
        self.nodes = []

    @property
    def endpoint(self):
        """The S3 endpoint of node 0."""
        return self.nodes[0].endpoint

    @property
    def endpoints(self):
        """The S3 endpoint of every node, by index."""
        return [n.endpoint for n in self.nodes]

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        rpc_secret = secrets.token_hex(32)
        self.nodes = [_Node(self.binary, self.root, i, self.nodes_wanted, rpc_secret)
                      for i in range(self.nodes_wanted)]
        for n in self.nodes:
            n.start()
        addresses = [n.wait_started() for n in self.nodes]
        first = self.nodes[0]
        for addr in addresses[1:]:
            _poll(lambda a=addr: first.cli("node", "connect", a), f"node 0 to connect to {addr}")
        # `node id` answers from the key file before the RPC port listens: poll what follows.
        for i, n in enumerate(self.nodes):
            _poll(lambda n=n, i=i: first.cli("layout", "assign", "-z", f"dc{i + 1}", "-c", "1G", n.node_id),
                  f"the layout assignment of node {i}")
        _poll(lambda: first.cli("layout", "apply", "--version", "1"), "the layout apply")
        _poll(lambda: first.cli("key", "import", "--yes", "-n", "sealvol", self.access_key, self.secret_key),
              "the key import")
        _poll(lambda: first.cli("bucket", "create", self.bucket), "the bucket creation")
        _poll(lambda: first.cli("bucket", "allow", "--read", "--write", "--owner", self.bucket,
                                "--key", self.access_key), "the bucket permission")
        for endpoint in self.endpoints:
            c = self.client(endpoint)
            _poll(lambda c=c: c.head_bucket(Bucket=self.bucket), f"the S3 API at {endpoint}")
        return self

    def client(self, endpoint=None):
        """A boto3 S3 client with the harness's key, path-style, on node 0 (or `endpoint`)."""
        return boto3.client(
            "s3", endpoint_url=endpoint or self.endpoint, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"},
                          connect_timeout=3, read_timeout=30),
        )

    def write_aws_profile(self, directory, name):
        """Adds profile `name` (node 0's endpoint_url, the region, the key) to `directory`'s
        `config` and `credentials` files, keeping their other profiles (a kms-daemon's state
        directory holds its own there), and returns the environment that names the files."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config, credentials = directory / "config", directory / "credentials"
        section = "default" if name == "default" else f"profile {name}"
        _set_section(config, section, {"region": self.region, "endpoint_url": self.endpoint})
        _set_section(credentials, name, {"aws_access_key_id": self.access_key,
                                         "aws_secret_access_key": self.secret_key})
        return {"AWS_CONFIG_FILE": str(config), "AWS_SHARED_CREDENTIALS_FILE": str(credentials)}

    def kill(self, i):
        """SIGKILLs node `i` (its data stays; the others keep serving with quorum)."""
        self.nodes[i].kill()

    def stop(self):
        """Kills every node and removes the temporary directory the harness made."""
        for n in self.nodes:
            n.kill()
        if self._own_tmp:
            shutil.rmtree(self.root, ignore_errors=True)

    def logs(self):
        """The tail of every node's log, for assertion messages."""
        return "\n".join(f"--- node {i}\n{n.log()}" for i, n in enumerate(self.nodes))


def _set_section(path: Path, section, values):
    """Sets `section` of the INI file at `path` to `values`, keeping other sections; the
    file stays private (it holds secrets)."""
    ini = configparser.RawConfigParser()
    if path.exists():
        ini.read(path)
    if ini.has_section(section):
        ini.remove_section(section)
    ini.add_section(section)
    for k, v in values.items():
        ini.set(section, k, v)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        ini.write(f)
