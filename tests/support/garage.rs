//! A single-node Garage (S3-compatible object store) on loopback ports, for tests of the
//! S3 snapshot store: its own config, data and metadata in a temporary directory, a
//! layout, an access key and a bucket the key may read and write.
#![allow(dead_code, missing_docs)]

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The region Garage is configured with (Garage checks the signature's region).
pub const REGION: &str = "garage";

/// A running single-node Garage; killed on drop.
pub struct Garage {
    dir: tempfile::TempDir,
    child: Child,
    bin: PathBuf,
    config: PathBuf,
    /// `http://127.0.0.1:PORT` of the S3 API.
    pub endpoint: String,
    /// The bucket the key may use.
    pub bucket: String,
    /// The access key id.
    pub access_key: String,
    /// The secret access key.
    pub secret_key: String,
}

/// The garage binary: on PATH, else `~/.cargo/bin/garage` (where `scripts/setup` puts it).
pub fn binary() -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let home = std::env::var("HOME").unwrap_or_default();
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join("garage"))
        .chain(std::iter::once(Path::new(&home).join(".cargo/bin/garage")))
        .find(|p| p.is_file())
}

/// A port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral loopback port")
        .port()
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    hex::encode(buf)
}

impl Garage {
    /// Starts Garage, or returns None after saying why when it is not installed (outside
    /// CI only: under CI=true a missing garage is a failure).
    pub fn start_or_skip(test: &str) -> Option<Self> {
        let Some(bin) = binary() else {
            let msg = format!("{test}: garage not installed (run scripts/setup)");
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{msg}; CI=true: skipping is a failure");
            }
            eprintln!("SKIPPED {msg} (not in CI, so skipping)");
            return None;
        };
        Some(Self::start(bin))
    }

    fn start(bin: PathBuf) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let config = dir.path().join("garage.toml");
        std::fs::write(
            &config,
            format!(
                r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
"#,
                meta = dir.path().join("meta").display(),
                data = dir.path().join("data").display(),
                secret = random_hex(32),
            ),
        )
        .expect("write garage.toml");
        let log = std::fs::File::create(dir.path().join("garage.log")).expect("garage.log");
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn garage server");
        let mut garage = Self {
            dir,
            child,
            bin,
            config,
            endpoint: format!("http://127.0.0.1:{s3}"),
            bucket: "snapshots".into(),
            access_key: format!("GK{}", random_hex(12)),
            secret_key: random_hex(32),
        };
        garage.set_up();
        garage
    }

    /// Runs `garage -c CONFIG args`; Err(output) when it fails.
    fn cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run garage");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(text)
        }
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        self.cli(args)
            .unwrap_or_else(|e| panic!("garage {args:?} failed: {e}\nserver log:\n{}", self.log()))
    }

    /// Runs `garage args` until it succeeds, for 30 s while the server lives: `node id`
    /// answers from the key file before the RPC port listens, so the first commands after
    /// it may meet "Connection refused".
    fn cli_retry(&mut self, args: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.cli(args) {
                Ok(out) => return out,
                Err(e) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        panic!("garage exited ({status}): {e}\n{}", self.log());
                    }
                    assert!(
                        Instant::now() < deadline,
                        "garage {args:?} failed for 30 s: {e}\nserver log:\n{}",
                        self.log()
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }

    fn set_up(&mut self) {
        let id = self.cli_retry(&["node", "id", "-q"]);
        let node = id.trim().split('@').next().unwrap_or("").to_owned();
        self.cli_retry(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        self.cli_retry(&["layout", "apply", "--version", "1"]);
        let (key, secret) = (self.access_key.clone(), self.secret_key.clone());
        self.cli_retry(&["key", "import", "--yes", "-n", "sealvol", &key, &secret]);
        let bucket = self.bucket.clone();
        self.cli_retry(&["bucket", "create", &bucket]);
        self.cli_retry(&[
            "bucket", "allow", "--read", "--write", "--owner", &bucket, "--key", &key,
        ]);
    }

    /// SIGKILLs the server.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Creates another bucket (no key allowed on it).
    pub fn create_bucket(&self, name: &str) {
        self.cli_ok(&["bucket", "create", name]);
    }

    /// Writes an AWS config and credentials file into the Garage's directory with
    /// `profile` (this Garage's endpoint, region and key, with `secret` as the secret) and
    /// returns their paths.
    pub fn write_profile(&self, profile: &str, endpoint: &str, secret: &str) -> (PathBuf, PathBuf) {
        let config = self.dir.path().join(format!("{profile}.config"));
        let creds = self.dir.path().join(format!("{profile}.credentials"));
        std::fs::write(
            &config,
            format!("[profile {profile}]\nregion = {REGION}\nendpoint_url = {endpoint}\n"),
        )
        .expect("write aws config");
        std::fs::write(
            &creds,
            format!(
                "[{profile}]\naws_access_key_id = {}\naws_secret_access_key = {secret}\n",
                self.access_key
            ),
        )
        .expect("write aws credentials");
        (config, creds)
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
