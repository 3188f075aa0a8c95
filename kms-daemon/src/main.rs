//! `kms-daemon` binary: parses arguments and calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

// The request path allocates many small short-lived buffers (JSON, headers); mimalloc
// handles that pattern with far less contention than glibc malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// AWS-KMS-compatible key service (JSON 1.1 protocol, SigV4, key policies, IAM
/// policies, enforced grants, durable audit log).
///
/// On first start creates in --state-dir: kms.db (SQLite, WAL), root.key (0600),
/// credentials and config (AWS shared-file formats with profiles admin, alice,
/// workspaces, ebs; config carries region and endpoint_url) and audit.log. Use them with
/// AWS_SHARED_CREDENTIALS_FILE=DIR/credentials AWS_CONFIG_FILE=DIR/config aws --profile alice kms ...
/// Prints "kms-daemon ready endpoint=http://ADDR [metrics=http://ADDR] ..." on stdout once listening; SIGTERM
/// or SIGINT shut it down cleanly.
#[derive(Debug, Parser)]
#[command(name = "kms-daemon", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// State directory (created on first start).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Listen address; port 0 picks a free port (see the ready line / ready file).
    #[arg(long, default_value = "127.0.0.1:4599")]
    listen: SocketAddr,
    /// AWS account id of the local account.
    #[arg(long, default_value = "111122223333")]
    account: String,
    /// Region.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Write {"endpoint":..,"pid":..,"metrics":..} to this file once listening
    /// ("metrics" only with --metrics-listen).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// TEST ONLY: enable POST /_sealvol/test/clock {"AdvanceSeconds":N} (unsigned) to move
    /// the key-lifecycle clock (rotation, deletion) forward.
    #[arg(long)]
    test_clock: bool,
    /// TEST ONLY: start the key-lifecycle clock this many seconds ahead of real time.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    clock_offset_secs: i64,
    /// Rotate audit.log once it reaches this many bytes (to audit.log.1, .2, ...; 0:
    /// never).
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    audit_max_bytes: u64,
    /// Rotated audit files kept (audit.log.1 .. audit.log.N).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    audit_keep: u32,
    /// Open connections allowed per peer address; more are closed at once.
    #[arg(long, default_value_t = kms_daemon::limits::MAX_CONNECTIONS_PER_PEER)]
    max_connections_per_peer: usize,
    /// Serve Prometheus metrics (GET /metrics, OpenMetrics text) on this address; off
    /// when absent. Unauthenticated like every Prometheus exporter: bind to loopback or a
    /// private network. Port 0 picks a free port (see the ready line / ready file).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the audit records about a key, one JSON line each.
    Audit {
        /// State directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Key id or ARN.
        #[arg(long)]
        key_id: String,
        /// Only this event name (e.g. Decrypt).
        #[arg(long)]
        event: Option<String>,
    },
    /// Attach (or replace) an IAM identity policy to a principal.
    PutPrincipalPolicy {
        /// State directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Principal ARN, e.g. arn:aws:iam::111122223333:user/Alice.
        #[arg(long)]
        principal: String,
        /// Policy document (JSON).
        #[arg(long)]
        policy_file: PathBuf,
        /// Policy name.
        #[arg(long, default_value = "inline")]
        policy_name: String,
    },
}

/// The daemon holds the root key and unwrapped key material: no core dumps (RLIMIT_CORE
/// 0) and not dumpable (no core file, no ptrace attach by other users, /proc/PID/mem
/// closed), as the sealvol agent does.
fn harden_process() {
    // Best effort, like the agent: a failure leaves the process as it was.
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
    let _ = nix::sys::prctl::set_dumpable(false);
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Audit {
            state_dir,
            key_id,
            event,
        }) => {
            for line in
                kms_daemon::audit::query(&state_dir.join("audit.log"), &key_id, event.as_deref())?
            {
                println!("{line}");
            }
            Ok(())
        }
        Some(Command::PutPrincipalPolicy {
            state_dir,
            principal,
            policy_file,
            policy_name,
        }) => {
            kms_daemon::state::put_principal_policy_cli(
                &state_dir,
                &principal,
                &policy_file,
                &policy_name,
            )?;
            Ok(())
        }
        None => {
            harden_process();
            let a = cli.serve;
            let state_dir = a
                .state_dir
                .context("--state-dir is required (see --help)")?;
            let cfg = kms_daemon::DaemonConfig {
                state_dir,
                listen: a.listen,
                account: a.account,
                region: a.region,
                ready_file: a.ready_file,
                test_clock: a.test_clock,
                clock_offset_secs: a.clock_offset_secs,
                audit_rotation: kms_daemon::audit::Rotation {
                    max_bytes: a.audit_max_bytes,
                    keep: a.audit_keep,
                },
                max_connections_per_peer: a.max_connections_per_peer,
                metrics_listen: a.metrics_listen,
            };
            let rt = tokio::runtime::Runtime::new().context("tokio runtime")?;
            let shutdown = {
                let _in_runtime = rt.enter();
                shutdown_signal()
            };
            rt.block_on(kms_daemon::run(cfg, shutdown))?;
            Ok(())
        }
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called (inside
/// the runtime), before the daemon reports ready: a signal that arrives right after the
/// ready line must take the graceful path, not the default action that kills the process.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let (Ok(mut term), Ok(mut int)) = (term, int) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    }
}
