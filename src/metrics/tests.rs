//! Unit tests of the agent's metrics and their endpoint.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use super::*;
use crate::backing::MemBacking;
use crate::device::{Crypt, Device, Geometry};
use crate::xts::SectorSize;

fn device(size: u64) -> Arc<Device> {
    let backing = Arc::new(MemBacking::new(usize::try_from(size).expect("small")));
    let geo = Geometry {
        data_offset: 0,
        size,
        sector_size: SectorSize::S4096,
    };
    Arc::new(Device::new(backing, geo, Crypt::Plain))
}

fn series<'a>(text: &'a str, name: &str, labels: &str) -> Option<&'a str> {
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
}

#[test]
fn requests_are_counted_per_volume_with_the_agent_labels() {
    let m = AgentMetrics::new(&[("workspace_id", "ws-0123456789")]);
    let root = m.volume_io("root");
    let user = m.volume_io("user");
    {
        let _busy = user.start();
        user.done(IoOp::Write, Ok(4096));
        user.done(IoOp::Write, Ok(8192));
        let text = m.encode().expect("encodes");
        assert_eq!(
            series(
                &text,
                "sealvol_volume_in_flight_requests",
                "volume=\"user\""
            ),
            Some("1")
        );
    }
    root.done(IoOp::Read, Ok(512));
    root.done(IoOp::Flush, Ok(0));
    root.done(IoOp::Read, Err(()));
    let text = m.encode().expect("encodes");
    let user_l = "volume=\"user\"";
    assert_eq!(
        series(&text, "sealvol_volume_writes_total", user_l),
        Some("2")
    );
    assert_eq!(
        series(&text, "sealvol_volume_written_bytes_total", user_l),
        Some("12288")
    );
    assert_eq!(
        series(&text, "sealvol_volume_in_flight_requests", user_l),
        Some("0")
    );
    let root_l = "volume=\"root\"";
    assert_eq!(
        series(&text, "sealvol_volume_reads_total", root_l),
        Some("1")
    );
    assert_eq!(
        series(&text, "sealvol_volume_read_bytes_total", root_l),
        Some("512")
    );
    assert_eq!(
        series(&text, "sealvol_volume_flushes_total", root_l),
        Some("1")
    );
    let errors = |volume: &str, op: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("sealvol_volume_errors_total")
                    && l.contains(&format!("volume=\"{volume}\""))
                    && l.contains(&format!("op=\"{op}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
    };
    assert_eq!(errors("root", "read"), Some("1"));
    assert_eq!(errors("user", "read"), Some("0"));
    assert_eq!(errors("root", "write"), Some("0"));
    assert!(
        text.lines()
            .filter(|l| l.starts_with("sealvol_"))
            .all(|l| l.contains("workspace_id=\"ws-0123456789\"")),
        "every series carries the agent's labels:\n{text}"
    );
}

#[test]
fn device_size_and_rekey_progress_are_read_at_scrape_time() {
    let mut m = AgentMetrics::new(&[]);
    let d = device(1 << 20);
    m.watch_devices(vec![("disk".into(), d)]);
    let text = m.encode().expect("encodes");
    assert_eq!(
        series(&text, "sealvol_volume_size_bytes", "volume=\"disk\""),
        Some("1048576")
    );
    assert_eq!(
        series(&text, "sealvol_rekey_in_progress", "volume=\"disk\""),
        Some("0")
    );
}

fn http(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(request.as_bytes()).expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

#[test]
fn the_endpoint_serves_get_metrics_only() {
    let m = AgentMetrics::new(&[]);
    m.volume_io("disk").done(IoOp::Write, Ok(1));
    let server = m
        .serve("127.0.0.1:0".parse().expect("addr"))
        .expect("binds");
    let ok = http(server.addr(), "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(ok.contains(CONTENT_TYPE_HEADER), "{ok}");
    assert!(
        ok.contains("sealvol_volume_writes_total{volume=\"disk\"} 1"),
        "{ok}"
    );
    assert!(ok.trim_end().ends_with("# EOF"), "{ok}");
    let head = http(server.addr(), "HEAD /metrics HTTP/1.1\r\n\r\n");
    assert!(
        head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"),
        "{head}"
    );
    let post = http(server.addr(), "POST /metrics HTTP/1.1\r\n\r\n");
    assert!(
        post.starts_with("HTTP/1.1 405 ") && post.contains("Allow: GET, HEAD"),
        "{post}"
    );
    let other = http(server.addr(), "GET / HTTP/1.1\r\n\r\n");
    assert!(other.starts_with("HTTP/1.1 404 "), "{other}");
    let junk = http(server.addr(), "\x16\x03\x01 hello\r\n\r\n");
    assert!(junk.starts_with("HTTP/1.1 400 "), "{junk}");
}

const CONTENT_TYPE_HEADER: &str =
    "Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8";

#[test]
fn the_target_file_names_the_bound_address_and_goes_away_with_the_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sd").join("agent.json");
    let m = AgentMetrics::new(&[("workspace_id", "ws-1")]);
    let mut server = m
        .serve("127.0.0.1:0".parse().expect("addr"))
        .expect("binds");
    server.publish_target(&path).expect("published");
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("written")).expect("json");
    assert_eq!(doc[0]["targets"][0], server.addr().to_string());
    assert_eq!(doc[0]["labels"]["workspace_id"], "ws-1");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o644,
        "Prometheus (another user) must read the target"
    );
    drop(server);
    assert!(!path.exists(), "the target outlived its server");
}

#[test]
fn a_bad_listen_address_is_refused_with_what_to_use() {
    let e = MetricsError::Address {
        value: "localhost".into(),
    };
    assert!(e.to_string().contains("127.0.0.1:9600"), "{e}");
}
