//! The serve loop: mounts FUSE over the exports, records the agent, serves its control
//! socket, waits for a termination signal, and tears down in order
//! ([`super::shutdown`]: sync, release, bounded by a timeout); and `detach`, the
//! other end. Detach order (DESIGN §5): unmount filesystems on loop devices over the
//! served files, detach those loops, unmount FUSE, then wait for the agent to flush, wipe
//! its keys and exit.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};

use super::AttachError;
use super::control::ControlServer;
use super::process::wait_for_exit;
use super::registry::{AgentRecord, canonical_mountpoint, read_record, record_path, write_record};
use super::shutdown::{Teardown, stop_timeout};
use super::snapshot::ChunkTracker;
use crate::fuse::{Export, VolumeFs, mount_config};
use crate::host::{is_mountpoint, mounts, release_loops};
use crate::metrics::AgentMetrics;

/// Serves `exports` at `mountpoint` in this process until unmounted or signalled.
///
/// `on_ready` runs once the mount is live (the background parent is told through it).
/// On return, every export has been flushed and the devices (and their keys) dropped.
///
/// # Errors
/// Mountpoint problems, mount failure.
pub fn serve(
    mountpoint: &Path,
    exports: Vec<Export>,
    threads: usize,
    on_ready: impl FnOnce(),
) -> Result<(), AttachError> {
    serve_with(mountpoint, exports, threads, &[], None, on_ready)
}

/// [`serve`], then resumes the interrupted rekeys of the exports named in `resume_rekeys`
/// (opened in rekey mode) in the background once the mount is live. With `metrics` (from
/// [`AgentMetrics::from_env`]), every export is counted and the agent serves Prometheus
/// metrics at the address, named in its record and in a `file_sd` target file
/// ([`metrics_target_path`]). Every agent listens on its control socket
/// ([`super::control_path`]) for online `rekey-volume` requests; pending rekeys stop at a
/// hotzone boundary on unmount and resume on the next attach.
///
/// # Errors
/// Mountpoint problems, mount failure.
pub fn serve_with(
    mountpoint: &Path,
    mut exports: Vec<Export>,
    threads: usize,
    resume_rekeys: &[String],
    metrics: Option<(AgentMetrics, SocketAddr)>,
    on_ready: impl FnOnce(),
) -> Result<(), AttachError> {
    let mountpoint = canonical_mountpoint(mountpoint)?;
    if is_mountpoint(&mountpoint) {
        return Err(AttachError::Mountpoint {
            path: mountpoint,
            why: "something is already mounted there".into(),
        });
    }
    // Block the termination signals in every thread; one thread waits for them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGHUP);
    let _ = signals.thread_block();

    let files: Vec<(String, PathBuf)> = exports
        .iter()
        .map(|e| (e.name.clone(), PathBuf::from(e.device.backing().name())))
        .collect();
    let devices: Vec<Arc<crate::device::Device>> =
        exports.iter().map(|e| e.device.clone()).collect();
    let exports_named: Vec<(String, Arc<crate::device::Device>)> = exports
        .iter()
        .map(|e| (e.name.clone(), e.device.clone()))
        .collect();
    // Changed-chunk tracking for snapshots, before any write is served. Copies made
    // before writes during a snapshot go beside the volume file, on its disk: the
    // runtime directory is usually a tmpfs, i.e. memory.
    let mut trackers = Vec::new();
    for (export, (name, file)) in exports.iter().zip(&files) {
        if file.is_file() {
            let staging = file
                .parent()
                .map_or_else(super::registry::runtime_dir, Path::to_path_buf);
            let tracker = ChunkTracker::attach(name, &export.device, file, &staging);
            trackers.push(tracker.map_err(|source| AttachError::Tracking {
                export: name.clone(),
                source,
            })?);
        }
    }
    let rec_path = record_path(&mountpoint);
    let metrics_server = match metrics {
        Some((mut m, addr)) => {
            for e in &mut exports {
                e.io = Some(m.volume_io(&e.name));
            }
            m.watch_devices(exports_named.clone());
            let mut server = m.serve(addr)?;
            server.publish_target(&metrics_target_path(&rec_path))?;
            Some(server)
        }
        None => None,
    };
    // SEALVOL_BACKING_IO (sync|uring|auto, see BackingIo), read once per agent.
    let engine = crate::backing::uring::BackingIo::from_env()
        .and_then(|mode| crate::device::async_io::engine_for(mode, &devices))
        .map_err(|e| AttachError::Agent(e.to_string()))?;
    if engine.is_some() {
        tracing::info!("backing I/O: io_uring, aligned requests answered on completion");
    } else {
        tracing::info!("backing I/O: synchronous");
    }
    // SEALVOL_FUSE_TRANSPORT (dev|uring|auto, see fuse_uring), read once per agent.
    let transport_err = |e: crate::fuse_uring::TransportError| AttachError::Agent(e.to_string());
    let (fs, transport) =
        crate::fuse_uring::prepare(VolumeFs::new(exports).with_engine(engine.clone()))
            .map_err(transport_err)?;
    let mut session =
        fuser::Session::new(fs, &mountpoint, &mount_config(threads)).map_err(|source| {
            AttachError::Mount {
                path: mountpoint.clone(),
                source,
            }
        })?;
    let transport = transport
        .start(std::os::fd::AsFd::as_fd(&session), threads)
        .map_err(transport_err)?;

    let mut record = AgentRecord::of_this_process(mountpoint.clone(), files);
    record.metrics = metrics_server.as_ref().map(|m| m.addr().to_string());
    record.fuse_transport = Some(transport.name().to_string());
    write_record(&rec_path, &record)?;

    let mut unmounter = session.unmount_callable();
    let teardown = Teardown {
        mountpoint: mountpoint.clone(),
        files: record.files.iter().map(|(name, _)| name.clone()).collect(),
        timeout: stop_timeout(),
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                tracing::info!("{sig:?}: stopping {}", teardown.mountpoint.display());
                teardown.run(|| unmounter.unmount());
            }
        })
        .map_err(|e| AttachError::State {
            path: rec_path.clone(),
            source: e,
        })?;

    let ctl_path = rec_path.with_extension("sock");
    let control =
        ControlServer::spawn(&ctl_path, exports_named, trackers.clone()).map_err(|e| {
            AttachError::State {
                path: ctl_path.clone(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
    on_ready();
    for name in resume_rekeys {
        if let Err(e) = control.resume(name) {
            tracing::error!("cannot resume the rekey of {name}: {e}");
        }
    }
    let result = session.run();
    transport.finish();
    if let Some(engine) = &engine {
        engine.drain(); // every write completed before the final flush
    }
    control.shutdown();
    let _ = std::fs::remove_file(&rec_path);
    let mut flushed = true;
    for d in &devices {
        if let Err(e) = d.flush() {
            tracing::error!("final flush failed: {e}");
            flushed = false;
        }
    }
    // Only a clean stop vouches for the dirty maps; otherwise they stay in use (untrusted).
    for t in trackers.iter().filter(|_| flushed) {
        if let Err(e) = t.close() {
            tracing::error!("{e}");
        }
    }
    drop(devices);
    drop(metrics_server);
    result.map_err(|source| AttachError::Mount {
        path: mountpoint,
        source,
    })
}

/// Where an agent publishes its metrics endpoint for Prometheus' file-based service
/// discovery: `$SEALVOL_METRICS_SD_DIR` (point a `file_sd_configs` glob at it, e.g.
/// `/run/sealvol-metrics/*.json`), else `metrics/` in the runtime directory; one file per
/// agent, named like its record.
#[must_use]
pub fn metrics_target_path(record: &Path) -> PathBuf {
    let dir = std::env::var_os("SEALVOL_METRICS_SD_DIR").map_or_else(
        || super::registry::runtime_dir().join("metrics"),
        PathBuf::from,
    );
    let name = record.file_name().unwrap_or(record.as_os_str());
    dir.join(name)
}

/// Detaches whatever sealvol serves at `mountpoint`: unmounts filesystems on loop devices
/// over its files, detaches those loops, unmounts FUSE, and waits for the agent to exit.
///
/// # Errors
/// Nothing attached, or something could not be unmounted (with what to do).
pub fn detach(mountpoint: &Path) -> Result<(), AttachError> {
    // The FUSE mount of an agent that died (kill -9) cannot even be stat'ed (ENOTCONN):
    // resolve its parent instead so that the dead mount can be cleaned up.
    let mountpoint = canonical_mountpoint(mountpoint).or_else(|e| {
        let parent = mountpoint
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        match (parent.canonicalize(), mountpoint.file_name()) {
            (Ok(p), Some(name)) if is_mountpoint(&p.join(name)) => Ok(p.join(name)),
            _ => Err(e),
        }
    })?;
    let rec_path = record_path(&mountpoint);
    let record = read_record(&rec_path);
    let fuse_mounted = mounts()
        .iter()
        .any(|m| m.target == mountpoint && m.fstype.starts_with("fuse"));
    if record.is_none() && !fuse_mounted {
        return Err(AttachError::NotAttached(mountpoint));
    }
    if fuse_mounted {
        for entry in std::fs::read_dir(&mountpoint)
            .into_iter()
            .flatten()
            .flatten()
        {
            release_loops(&entry.path())?;
        }
        nix::mount::umount(&mountpoint).map_err(|e| AttachError::Unmount {
            path: mountpoint.display().to_string(),
            why: format!(
                "{e} (close programs using it: `fuser -vm {}`)",
                mountpoint.display()
            ),
        })?;
    }
    if let Some(rec) = record {
        wait_for_exit(rec.pid);
    }
    let _ = std::fs::remove_file(&rec_path);
    Ok(())
}
