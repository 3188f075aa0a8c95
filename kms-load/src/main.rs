//! `kms-load`: SigV4-signed keep-alive load against an AWS-KMS-compatible endpoint.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kms_load::{self as loadgen, LoadOp, Target};

/// Measures Decrypt / GenerateDataKeyWithoutPlaintext throughput and latency.
///
/// Against kms-daemon: `kms-load --state-dir DIR` (uses the `admin` profile the daemon
/// wrote). Against moto_server: `kms-load --endpoint http://127.0.0.1:5000 --access-key x
/// --secret-key y`.
#[derive(Debug, Parser)]
#[command(name = "kms-load", version)]
struct Cli {
    /// Read endpoint and credentials from this daemon state directory.
    #[arg(long, conflicts_with = "endpoint")]
    state_dir: Option<PathBuf>,
    /// Profile to use with --state-dir.
    #[arg(long, default_value = "admin")]
    profile: String,
    /// Endpoint URL (http://HOST:PORT) when not using --state-dir.
    #[arg(long)]
    endpoint: Option<String>,
    /// Access key id (with --endpoint).
    #[arg(long, default_value = "testing")]
    access_key: String,
    /// Secret key (with --endpoint).
    #[arg(long, default_value = "testing")]
    secret_key: String,
    /// Region.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Operations to measure.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [LoadOp::Decrypt, LoadOp::GenerateDataKeyWithoutPlaintext])]
    op: Vec<LoadOp>,
    /// Concurrent clients (comma-separated list runs each in turn).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16])]
    clients: Vec<usize>,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Warm-up seconds per run (not measured).
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Use this key instead of creating one.
    #[arg(long)]
    key_id: Option<String>,
    /// Hold this many unauthenticated connections with unfinished bodies open during
    /// every run (reopened when the server closes them).
    #[arg(long, default_value_t = 0)]
    slow_clients: usize,
    /// Local source addresses the slow connections are spread over (127.0.0.2, ...).
    #[arg(long, default_value_t = 8)]
    slow_sources: usize,
    /// Output format.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    output: String,
}

/// Slow connections need descriptors: raise the soft limit to the hard one.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    raise_open_files_limit();
    let target = match (&cli.state_dir, &cli.endpoint) {
        (Some(dir), _) => Target::from_state_dir(dir, &cli.profile)?,
        (None, Some(e)) => Target {
            endpoint: e.clone(),
            region: cli.region.clone(),
            access_key: cli.access_key.clone(),
            secret_key: cli.secret_key.clone(),
        },
        (None, None) => anyhow::bail!("give --state-dir or --endpoint"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let mut reports = Vec::new();
    rt.block_on(async {
        for op in &cli.op {
            let body = loadgen::prepare(&target, *op, cli.key_id.clone()).await?;
            for clients in &cli.clients {
                let slow = if cli.slow_clients > 0 {
                    let s = loadgen::SlowClients::start(&target, cli.slow_clients, cli.slow_sources)?;
                    let n = s.wait_open(cli.slow_clients * 9 / 10, Duration::from_secs(20)).await;
                    eprintln!("slow connections open: {n}");
                    Some(s)
                } else {
                    None
                };
                let r = loadgen::run(&target, *op, body.clone(), *clients, Duration::from_secs(cli.warmup), Duration::from_secs(cli.duration)).await?;
                let slow_open = slow.as_ref().map_or(0, loadgen::SlowClients::open);
                if let Some(s) = slow {
                    s.stop().await;
                }
                if cli.output == "text" {
                    println!(
                        "{:?} clients={} req/s={:.0} p50={:.2}ms p99={:.2}ms max={:.2}ms ok={} errors={} reconnects={} slow_open_at_end={}",
                        r.operation, r.clients, r.requests_per_second, r.p50_ms, r.p99_ms, r.max_ms, r.requests, r.errors, r.reconnects, slow_open
                    );
                }
                reports.push(r);
            }
        }
        anyhow::Ok(())
    })?;
    if cli.output == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"endpoint": target.endpoint, "runs": reports})
            )?
        );
    }
    Ok(())
}
