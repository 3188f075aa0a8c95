//! Command-line interface: clap definitions and dispatch into the library.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

mod global;
mod output;
mod progress;
mod workspaces;

pub use global::GlobalOptions;

use output::{emit, print_json};

use crate::agent::{self, AttachError};
use crate::backing::CacheMode;
use crate::fuse::Export;
use crate::metrics::AgentMetrics;
use crate::secret::{SecretError, VolumeKey};
use crate::volume::{self, CreateParams, Encryption, GIB, VolumeError};
use crate::xts::SectorSize;

/// Output format.
#[derive(Debug, Clone, Copy, Default, ValueEnum, PartialEq, Eq)]
pub enum Output {
    /// Human-readable table.
    #[default]
    Table,
    /// JSON (stable field names).
    Json,
}

/// What a rekey journals per hotzone (as `cryptsetup reencrypt --resilience`).
#[derive(Debug, Clone, Copy, Default, ValueEnum, PartialEq, Eq)]
pub enum ResilienceArg {
    /// A full copy of the old ciphertext: repairs any torn write; writes every byte twice.
    #[default]
    Journal,
    /// 16 bytes per 512 and the zone's BLAKE3: about half the writes; relies on 512-byte
    /// writes being atomic, and detects (does not repair) a tear below that.
    Checksum,
}

/// sealvol: encrypted virtual disks (LUKS2, aes-xts-plain64) served through FUSE.
#[derive(Debug, Parser)]
#[command(name = "sealvol", version, about, long_about = None)]
pub struct Cli {
    /// Options every verb takes, before or after it.
    #[command(flatten)]
    pub global: GlobalOptions,
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Create a volume file: LUKS2 with an aes-xts-plain64 data area, or the plain form.
    CreateVolume {
        /// The volume file to create (sparse).
        #[arg(long)]
        path: PathBuf,
        /// Data size in GiB.
        #[arg(long)]
        size_gib: u64,
        /// Sector size of the data area.
        #[arg(long, default_value_t = 4096, value_parser = parse_sector_size)]
        sector_size: u32,
        /// File holding the 64-byte raw volume key (break-glass / test path).
        #[arg(
            long,
            required_unless_present = "unencrypted",
            conflicts_with = "unencrypted"
        )]
        volume_key_file: Option<PathBuf>,
        /// Create the plain (unencrypted) form: no header, same data layout.
        #[arg(long)]
        unencrypted: bool,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Serve a volume as DIR/disk through FUSE (then: losetup, mkfs.ext4, mount).
    ///
    /// SEALVOL_FUSE_TRANSPORT picks how the kernel's FUSE requests reach the agent:
    /// `dev` (the default) reads them from /dev/fuse; `uring` uses FUSE over io_uring and
    /// fails unless the kernel offers it (as root: `echo Y >
    /// /sys/module/fuse/parameters/enable_uring`); `auto` uses io_uring when offered and
    /// /dev/fuse otherwise. The agent's record (`fuse_transport`) names the one in effect.
    Attach {
        /// The volume file.
        #[arg(long)]
        path: PathBuf,
        /// An existing empty directory to mount on.
        #[arg(long)]
        mountpoint: PathBuf,
        /// File holding the 64-byte raw volume key.
        #[arg(
            long,
            required_unless_present = "unencrypted",
            conflicts_with = "unencrypted"
        )]
        volume_key_file: Option<PathBuf>,
        /// Serve a plain (unencrypted) volume.
        #[arg(long)]
        unencrypted: bool,
        /// Stay in the foreground until unmounted or interrupted.
        #[arg(long)]
        foreground: bool,
        /// FUSE event-loop threads (with io_uring: ring workers per kernel queue).
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Host caching of the volume file, with qemu's names: `none` (O_DIRECT, no host
        /// page cache, as on EBS) or `writeback` (through the host page cache; durable at
        /// flush either way). With `none`, SEALVOL_BACKING_IO=uring (or `auto`) serves
        /// aligned requests asynchronously through io_uring; the default is `sync`.
        #[arg(long, default_value = "none", value_parser = parse_cache_mode)]
        cache: CacheMode,
        /// Background agent's log file (default: discarded).
        #[arg(long)]
        log_file: Option<PathBuf>,
        /// The new key of an interrupted rekey: with both keys, attach resumes the rekey
        /// in the background while serving.
        #[arg(long, requires = "volume_key_file")]
        new_volume_key_file: Option<PathBuf>,
    },
    /// Re-encrypt every sector under a new data key, crash-safe; online for an attached
    /// volume. Running it again after a crash resumes.
    RekeyVolume {
        /// A detached volume file.
        #[arg(long, required_unless_present_any = ["mountpoint", "workspace_id"], conflicts_with_all = ["mountpoint", "workspace_id"])]
        path: Option<PathBuf>,
        /// A WorkSpace: its encrypted volumes get new data keys from the KMS (online while
        /// it runs, under the same grants and context).
        #[arg(long, conflicts_with = "mountpoint")]
        workspace_id: Option<String>,
        /// With --workspace-id: only this volume.
        #[arg(long, requires = "workspace_id")]
        volume_id: Option<String>,
        /// The mountpoint of a volume attached with `attach` (the agent does the rekey).
        #[arg(long)]
        mountpoint: Option<PathBuf>,
        /// The current 64-byte key file (with --path).
        #[arg(long, required_unless_present_any = ["mountpoint", "workspace_id"])]
        volume_key_file: Option<PathBuf>,
        /// The new 64-byte key file (not with --workspace-id: the KMS makes the new key).
        #[arg(
            long,
            required_unless_present = "workspace_id",
            conflicts_with = "workspace_id"
        )]
        new_volume_key_file: Option<PathBuf>,
        /// The volume is detached (implied by --path; refuses a mountpoint).
        #[arg(long, conflicts_with = "mountpoint")]
        offline: bool,
        /// Hotzone size in MiB (default 2 online, 8 offline; at most the keyslots area, or
        /// 32 times it with --resilience checksum).
        #[arg(long)]
        hotzone_mib: Option<u64>,
        /// What each hotzone's journal holds (with --path or --mountpoint; a resumed rekey
        /// keeps the mode it started with).
        #[arg(long, value_enum, default_value_t, conflicts_with = "workspace_id")]
        resilience: ResilienceArg,
        /// Served file to rekey with --mountpoint (default: the only one).
        #[arg(long, requires = "mountpoint")]
        file: Option<String>,
    },
    /// Unmount filesystems and loop devices over an attached volume, unmount FUSE, wipe keys.
    Detach {
        /// The mountpoint given to attach.
        #[arg(long)]
        mountpoint: PathBuf,
    },
    /// Show a volume's header facts (no secrets).
    DescribeVolume {
        /// The volume file.
        #[arg(long)]
        path: PathBuf,
    },
    /// Measure cipher throughput (aes-xts-plain64, 512/4096-byte sectors, 1 and all threads).
    Bench {
        /// Seconds per figure.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
    },
    /// WorkSpaces lifecycle verbs.
    #[command(flatten)]
    Workspace(workspaces::WorkspaceCmd),
}

/// Everything the CLI can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Volume errors.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// Key errors.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// Attach/detach errors.
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// Rekey errors.
    #[error(transparent)]
    Rekey(#[from] crate::rekey::RekeyError),
    /// Lifecycle controller errors.
    #[error(transparent)]
    Controller(#[from] crate::controller::ControllerError),
    /// A batch verb had refused items (already printed).
    #[error("{0} request(s) failed")]
    Failed(usize),
    /// `recover-workspaces` left WorkSpaces down (already printed, with the reasons).
    #[error("{0} WorkSpace(s) could not be recovered (see the reasons above)")]
    LeftDown(usize),
}

impl CliError {
    /// The process exit status: 3 when recovery left WorkSpaces down (the others are up:
    /// a service manager may treat it as success), 1 for every other failure.
    #[must_use]
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::LeftDown(_) => ExitCode::from(3),
            _ => ExitCode::FAILURE,
        }
    }
}

/// Runs the CLI; maps errors to a message on stderr and an exit status ([`CliError::exit_code`]).
#[must_use]
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if std::env::var_os("SEALVOL_AGENT").is_some() {
                // The parent waiting for our ready line shows this to the user.
                agent::report_error(&e);
            }
            eprintln!("sealvol: error: {e}");
            e.exit_code()
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SEALVOL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Dispatches a parsed command. Every verb first hardens the process
/// ([`crate::secret::harden_process`]: no core dumps, not dumpable, no ptrace by other
/// users): most verbs unwrap or hold a data key (create-volume, attach, rekey-volume,
/// rewrap-volume, and the WorkSpace verbs that launch, attach or rekey), and hardening
/// every verb means a new one cannot forget it.
///
/// # Errors
/// Whatever the command fails with.
pub fn run(cli: Cli) -> Result<(), CliError> {
    crate::secret::harden_process();
    let global = cli.global;
    let output = global.output;
    match cli.command {
        Cmd::CreateVolume {
            path,
            size_gib,
            sector_size,
            volume_key_file,
            unencrypted: _,
            force,
        } => {
            let sector_size =
                SectorSize::try_from(sector_size).map_err(|e| CliError::Usage(e.to_string()))?;
            let size = size_gib
                .checked_mul(GIB)
                .filter(|&s| s > 0)
                .ok_or_else(|| {
                    CliError::Usage(format!("--size-gib {size_gib} is not a usable size"))
                })?;
            let key = volume_key_file
                .as_deref()
                .map(VolumeKey::from_file)
                .transpose()?;
            let encryption = key.as_ref().map(|key| Encryption {
                key,
                token: None,
                label: String::new(),
            });
            volume::create(&CreateParams {
                path: &path,
                size,
                sector_size,
                force,
                encryption,
            })?;
            describe(&path, output)
        }
        Cmd::Attach {
            path,
            mountpoint,
            volume_key_file,
            unencrypted: _,
            foreground,
            threads,
            cache,
            log_file,
            new_volume_key_file,
        } => {
            if foreground || std::env::var_os("SEALVOL_AGENT").is_some() {
                attach_here(
                    &path,
                    &mountpoint,
                    volume_key_file.as_deref(),
                    new_volume_key_file.as_deref(),
                    threads,
                    cache,
                )
            } else {
                let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
                args.push("--foreground".into());
                agent::spawn_agent(&args, log_file.as_deref())?;
                eprintln!(
                    "attached {} at {}",
                    path.display(),
                    mountpoint.join("disk").display()
                );
                Ok(())
            }
        }
        Cmd::Detach { mountpoint } => Ok(agent::detach(&mountpoint)?),
        Cmd::RekeyVolume {
            path,
            workspace_id,
            volume_id,
            mountpoint,
            volume_key_file,
            new_volume_key_file,
            offline: _,
            hotzone_mib,
            resilience,
            file,
        } => {
            let hotzone_bytes = hotzone_mib
                .map(|m| {
                    m.checked_mul(1024 * 1024)
                        .ok_or_else(|| CliError::Usage(format!("--hotzone-mib {m} is too large")))
                })
                .transpose()?;
            if let Some(ws) = workspace_id {
                return workspaces::rekey(
                    &global,
                    &ws,
                    volume_id.as_deref(),
                    hotzone_bytes,
                    output,
                );
            }
            let new_key_file = new_volume_key_file
                .ok_or_else(|| CliError::Usage("--new-volume-key-file is required".into()))?;
            rekey_volume(
                path.as_deref(),
                mountpoint.as_deref(),
                volume_key_file.as_deref(),
                &new_key_file,
                crate::rekey::RekeyOptions {
                    hotzone_bytes,
                    new_kms_token: None,
                    resilience: match resilience {
                        ResilienceArg::Journal => crate::rekey::Resilience::Journal,
                        ResilienceArg::Checksum => crate::rekey::Resilience::Checksum,
                    },
                },
                file,
                output,
            )
        }
        Cmd::Workspace(cmd) => workspaces::run(cmd, &global),
        Cmd::DescribeVolume { path } => describe(&path, output),
        Cmd::Bench { seconds } => {
            if !(seconds > 0.0 && seconds <= 600.0) {
                return Err(CliError::Usage("--seconds must be in (0, 600]".into()));
            }
            let figures = crate::bench::cipher_figures(Duration::from_secs_f64(seconds));
            emit(output, &figures, || {
                println!(
                    "{:<18} {:>8} {:>8} {:>8} {:>8} {:>12}",
                    "cipher", "key", "sector", "threads", "op", "MB/s"
                );
                for f in &figures {
                    println!(
                        "{:<18} {:>5}b {:>8} {:>8} {:>8} {:>12.1}",
                        f.cipher, f.key_bits, f.sector_size, f.threads, f.op, f.mb_per_s
                    );
                }
            });
            Ok(())
        }
    }
}

/// `--cache`: `writeback` or `none` (also used by the WorkSpaces verbs).
pub(crate) fn parse_cache_mode(s: &str) -> Result<CacheMode, String> {
    s.parse::<CacheMode>().map_err(|e| e.to_string())
}

fn parse_sector_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!(
            "{s} is not a supported sector size (use 512 or 4096)"
        )),
    }
}

fn attach_here(
    path: &Path,
    mountpoint: &Path,
    key_file: Option<&Path>,
    new_key_file: Option<&Path>,
    threads: usize,
    cache: CacheMode,
) -> Result<(), CliError> {
    let mut resume = Vec::new();
    let opened = match (key_file, new_key_file) {
        (Some(kf), Some(nkf)) => {
            let key = VolumeKey::from_file(kf)?;
            let new = VolumeKey::from_file(nkf)?;
            // Serve whichever key the data segment is under (the old one while a rekey is
            // pending, which then resumes with the new one).
            let opened = agent::open_for_serving::<_, CliError>(
                path,
                |h| {
                    Ok(if h.verify_key(&new).is_ok() {
                        &new
                    } else {
                        &key
                    })
                },
                |_| Ok(&new),
            )?;
            if opened.resume_rekey {
                resume.push("disk".to_string());
            }
            opened.volume
        }
        (Some(kf), None) => {
            let key = VolumeKey::from_file(kf)?;
            volume::open_encrypted(path, &key)?
        }
        (None, _) => volume::open_plain(path)?,
    };
    opened.set_cache(cache)?;
    let exports = vec![Export::new("disk", opened.device)];
    let metrics = AgentMetrics::from_env(&[]).map_err(AttachError::from)?;
    let in_agent = std::env::var_os("SEALVOL_AGENT").is_some();
    agent::serve_with(mountpoint, exports, threads, &resume, metrics, || {
        if in_agent {
            agent::report_ready();
        } else {
            eprintln!(
                "serving {} at {} (Ctrl-C or `sealvol detach` to stop)",
                path.display(),
                mountpoint.join("disk").display()
            );
        }
    })?;
    Ok(())
}

fn describe(path: &Path, output: Output) -> Result<(), CliError> {
    let info = volume::describe(path)?;
    if output == Output::Json {
        print_json(&info);
        return Ok(());
    }
    println!("Path:            {}", info.path);
    println!("Format:          {}", info.format);
    println!(
        "Encrypted:       {}",
        if info.encrypted { "yes" } else { "no" }
    );
    if let Some(c) = &info.cipher {
        println!("Cipher:          {c} ({} bits)", info.key_bits.unwrap_or(0));
    }
    println!("Sector size:     {}", info.sector_size);
    println!(
        "Size:            {} bytes ({:.2} GiB)",
        info.size_bytes,
        info.size_bytes as f64 / GIB as f64
    );
    println!("Data offset:     {}", info.data_offset);
    println!("Allocated:       {} bytes", info.allocated_bytes);
    if let Some(p) = &info.rekey_in_progress {
        println!(
            "Rekey:           in progress, {} of {} bytes under the new key ({:.1}%); resume with `sealvol rekey-volume`",
            p.done,
            p.total,
            p.done as f64 * 100.0 / p.total.max(1) as f64
        );
    }
    if let Some(u) = &info.uuid {
        println!("UUID:            {u}");
        println!(
            "Header seqid:    {} (read from {} copy)",
            info.seqid.unwrap_or(0),
            info.header_copy.as_deref().unwrap_or("?")
        );
    }
    if let Some(t) = &info.kms_token {
        println!("KMS key:         {}", t.key_arn);
        println!(
            "Volume:          {} ({}) of {}",
            t.volume_id, t.volume_kind, t.workspace_id
        );
        for (k, v) in &t.encryption_context {
            println!("Context:         {k} = {v}");
        }
    }
    Ok(())
}

fn rekey_volume(
    path: Option<&Path>,
    mountpoint: Option<&Path>,
    key_file: Option<&Path>,
    new_key_file: &Path,
    opts: crate::rekey::RekeyOptions,
    file: Option<String>,
    output: Output,
) -> Result<(), CliError> {
    use crate::agent::ControlRequest;
    use crate::rekey::Progress;
    let bar =
        progress::ByteBar::new("rekey {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}");
    let update = |p: Progress| bar.update(p.done, p.total);
    let (report, target) = match (path, mountpoint) {
        (Some(path), _) => {
            let old = VolumeKey::from_file(
                key_file.ok_or_else(|| CliError::Usage("--path needs --volume-key-file".into()))?,
            )?;
            let new = VolumeKey::from_file(new_key_file)?;
            (
                agent::rekey_offline(path, &old, &new, &opts, update)?,
                path.display().to_string(),
            )
        }
        (None, Some(mp)) => {
            // The key goes to the agent over its control socket (SO_PEERCRED-checked),
            // never as a path for it to open.
            let req = ControlRequest::Rekey {
                export: file,
                new_volume_key: VolumeKey::from_file(new_key_file)?,
                hotzone_bytes: opts.hotzone_bytes,
                new_kms_token: None,
                resilience: opts.resilience,
            };
            (
                agent::request_online(mp, &req, update)?,
                mp.display().to_string(),
            )
        }
        (None, None) => {
            return Err(CliError::Usage(
                "give --path FILE or --mountpoint DIR".into(),
            ));
        }
    };
    bar.finish();
    emit(output, &report, || {
        if report.already_done {
            println!("{target}: already under the new key; nothing to do");
        } else {
            println!(
                "{target}: rekeyed {} bytes{} in {:.1} s ({:.1} MB/s)",
                report.bytes_this_run,
                if report.resumed { " (resumed)" } else { "" },
                report.seconds,
                report.mb_per_s
            );
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests;
