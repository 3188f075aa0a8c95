"""The kms-daemon under test: a real daemon process, boto3 clients
per profile (from the credentials/config files the daemon writes), the AWS CLI, and a
small independent SigV4 signer for the protocol-failure tests."""

import datetime
import hashlib
import hmac
import json
import os
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import botocore.session
from unittest import mock

from botocore.auth import SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from sealvol_testing.paths import AWS_CLI, KMS_DAEMON_BIN, require_binary

DAEMON_BIN = KMS_DAEMON_BIN
ACCOUNT = "111122223333"
REGION = "us-east-1"
ALICE = f"arn:aws:iam::{ACCOUNT}:user/Alice"
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
FORWARD_ACCESS = "x-sealvol-forward-access"
WORKSPACES = "workspaces.amazonaws.com"


def wait_for(predicate, timeout=30.0, what="condition"):
    """Polls `predicate` until truthy or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Daemon:
    """A kms-daemon process on a free loopback port with its own state directory."""

    def __init__(self, state_dir: Path, extra_args=()):
        self.state_dir = state_dir
        self.extra_args = list(extra_args)
        self.proc = None
        self.endpoint = None

    def start(self):
        require_binary(DAEMON_BIN, "KMS_DAEMON_BIN")
        ready = self.state_dir.parent / (self.state_dir.name + ".ready")
        if ready.exists():
            ready.unlink()
        self.log = open(self.state_dir.parent / (self.state_dir.name + ".log"), "ab")
        self.proc = subprocess.Popen(
            [str(DAEMON_BIN), "--state-dir", str(self.state_dir), "--listen", "127.0.0.1:0",
             "--ready-file", str(ready), *self.extra_args],
            stdout=subprocess.PIPE, stderr=self.log,
        )

        def is_ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"kms-daemon exited with {self.proc.returncode}")
            return ready.exists() and ready.read_text()

        info = json.loads(wait_for(is_ready, what="kms-daemon ready file"))
        self.endpoint = info["endpoint"]
        line = self.proc.stdout.readline().decode()
        assert line.startswith("kms-daemon ready endpoint="), line
        return self

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=timeout)
        code = self.proc.returncode if self.proc else None
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
        return code

    def kill9(self):
        return self.stop(signal.SIGKILL)

    def restart(self):
        self.stop()
        return self.start()

    # --- clients -------------------------------------------------------------
    def session(self, profile):
        bs = botocore.session.Session()
        bs.set_config_variable("credentials_file", str(self.state_dir / "credentials"))
        bs.set_config_variable("config_file", str(self.state_dir / "config"))
        bs.set_config_variable("profile", profile)
        return boto3.Session(botocore_session=bs)

    def client(self, profile, forward_for=None, token=None):
        """A boto3 KMS client signing as `profile`. With `forward_for` (a profile name) it
        carries that user's forward-access token, presigned by botocore with the user's
        own credentials; `token` sends a given (possibly forged) token instead."""
        c = self.session(profile).client("kms", config=Config(retries={"max_attempts": 1, "mode": "standard"}, parameter_validation=False))
        assert c.meta.endpoint_url == self.endpoint
        if forward_for or token:
            def add_header(request, **_):
                # A fresh token per request, as the controller makes them.
                request.headers[FORWARD_ACCESS] = token or self.forward_token(forward_for)
            c.meta.events.register("before-sign.kms.*", add_header)
        return c

    def forward_token(self, profile, delegate=WORKSPACES, expires=300, age=0, secret=None, host=None, nonce=None):
        """A forward-access token (DESIGN §2): a SigV4 presigned GET made by botocore's own
        query signer with `profile`'s credentials (or `secret`), dated `age` seconds ago."""
        ak, sk = self.credentials(profile)
        host = host or self.endpoint.split("://", 1)[1]
        nonce = nonce or secrets.token_hex(16)
        url = f"http://{host}/?Action=ForwardAccess&X-Sealvol-Delegate={delegate}&X-Sealvol-Nonce={nonce}"
        req = AWSRequest(method="GET", url=url)
        when = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - datetime.timedelta(seconds=age)
        with mock.patch("botocore.auth.get_current_datetime", return_value=when):
            SigV4QueryAuth(Credentials(ak, secret or sk), "kms", REGION, expires=expires).add_auth(req)
        return req.url

    def credentials(self, profile):
        creds = self.session(profile).get_credentials()
        return creds.access_key, creds.secret_key

    def cli(self, profile, *args, check=True):
        env = dict(os.environ)
        env.update({
            "AWS_SHARED_CREDENTIALS_FILE": str(self.state_dir / "credentials"),
            "AWS_CONFIG_FILE": str(self.state_dir / "config"),
            "AWS_MAX_ATTEMPTS": "1",
        })
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
            env.pop(k, None)
        p = subprocess.run([str(AWS_CLI), "--profile", profile, "kms", *args], capture_output=True, text=True, env=env, timeout=60)
        if check and p.returncode != 0:
            raise AssertionError(f"aws kms {' '.join(args)} failed: {p.stderr}")
        return p

    def advance_clock(self, seconds):
        req = urllib.request.Request(self.endpoint + "/_sealvol/test/clock", data=json.dumps({"AdvanceSeconds": seconds}).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def audit(self, key_id, event=None):
        args = [str(DAEMON_BIN), "audit", "--state-dir", str(self.state_dir), "--key-id", key_id]
        if event:
            args += ["--event", event]
        out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=30).stdout
        return [json.loads(l) for l in out.splitlines() if l.strip()]

    # --- raw, independently signed requests -----------------------------------
    def raw(self, target, body, profile="admin", *, amz_date=None, secret=None, access_key=None,
            extra_headers=None, unsigned_headers=None, tamper_body=None, sign=True, content_type="application/x-amz-json-1.1"):
        ak, sk = self.credentials(profile)
        ak = access_key or ak
        sk = secret or sk
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        host = self.endpoint.split("://", 1)[1]
        headers = {"host": host, "content-type": content_type}
        if target is not None:
            headers["x-amz-target"] = target
        headers.update({k.lower(): v for k, v in (extra_headers or {}).items()})
        if sign:
            now = amz_date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            headers["x-amz-date"] = now
            headers["authorization"] = sigv4(headers, data, ak, sk, now)
        headers.update({k.lower(): v for k, v in (unsigned_headers or {}).items()})
        if tamper_body is not None:
            data = tamper_body
        req = urllib.request.Request(self.endpoint + "/", data=data, method="POST")
        for k, v in headers.items():
            if k != "host":
                req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, {"raw": raw.decode(errors="replace")}


def sigv4(headers, body, ak, sk, amz_date, region=REGION, service="kms"):
    """Signs per the SigV4 spec (independent of botocore and of the daemon's crate)."""
    names = sorted(headers)
    canonical_headers = "".join(f"{n}:{' '.join(str(headers[n]).split())}\n" for n in names)
    signed = ";".join(names)
    creq = "\n".join(["POST", "/", "", canonical_headers, signed, hashlib.sha256(body).hexdigest()])
    date = amz_date[:8]
    scope = f"{date}/{region}/{service}/aws4_request"
    sts = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(creq.encode()).hexdigest()])
    k = hmac.new(("AWS4" + sk).encode(), date.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
    return f"AWS4-HMAC-SHA256 Credential={ak}/{scope}, SignedHeaders={signed}, Signature={sig}"


def error_code(excinfo):
    return excinfo.value.response["Error"]["Code"]
