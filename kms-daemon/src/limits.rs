//! What a peer may hold and how long a request body may take: connection caps (per peer
//! address and in total, decided right after accept so the accept loop never waits),
//! the body size cap decided from `Content-Length` before any byte is read, and a body
//! deadline that grows with the declared length at a minimum rate. A request takes an
//! operation slot only once its body is complete (see [`crate::server`]), so clients
//! that trickle bodies hold a connection, never capacity honest requests need.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body_util::BodyExt;
use tokio::time::Instant;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 256 * 1024;
/// Time every request body gets, whatever its length.
pub const BODY_BASE_DEADLINE: Duration = Duration::from_secs(2);
/// Slowest accepted average body rate (bytes per second) beyond the base deadline.
pub const BODY_MIN_RATE: u64 = 64 * 1024;
/// Longest any request body may take (a chunked body, whose length is unknown, gets this).
pub const BODY_MAX_DEADLINE: Duration = Duration::from_secs(6);
/// After a 413, at most this many body bytes are read and discarded so that a client
/// still sending can read the answer ...
pub const DRAIN_LIMIT: u64 = 16 * 1024 * 1024;
/// ... for at most this long; then the connection is closed.
pub const DRAIN_TIME: Duration = Duration::from_secs(10);
/// Open connections at once, all peers together.
pub const MAX_CONNECTIONS: usize = 8192;
/// Open connections at once from one peer address.
pub const MAX_CONNECTIONS_PER_PEER: usize = 256;

/// Why a request body was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Declared or streamed beyond [`BODY_LIMIT`].
    #[error("Request body is larger than {BODY_LIMIT} bytes")]
    TooLarge,
    /// Not complete before its deadline.
    #[error("The request body was not received in time")]
    TooSlow,
    /// The client hung up or sent a malformed body.
    #[error("The request body ended early")]
    Broken,
}

impl BodyError {
    /// HTTP status sent for it.
    pub fn status(self) -> u16 {
        match self {
            Self::TooLarge => 413,
            Self::TooSlow => 408,
            Self::Broken => 400,
        }
    }

    /// AWS `__type` sent for it.
    pub fn code(self) -> &'static str {
        match self {
            Self::TooLarge | Self::Broken => "ValidationException",
            Self::TooSlow => "RequestTimeoutException",
        }
    }
}

/// The `Content-Length` a request declares (hyper has already refused malformed ones);
/// `None` for chunked bodies.
pub fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// How long a body of `declared` bytes may take: [`BODY_BASE_DEADLINE`] plus the time
/// at [`BODY_MIN_RATE`], at most [`BODY_MAX_DEADLINE`].
pub fn body_deadline(declared: Option<u64>) -> Duration {
    match declared {
        None => BODY_MAX_DEADLINE,
        Some(n) => {
            let at_rate = Duration::from_millis(n.saturating_mul(1000) / BODY_MIN_RATE);
            (BODY_BASE_DEADLINE + at_rate).min(BODY_MAX_DEADLINE)
        }
    }
}

/// Reads the whole body by `deadline`, refusing it as soon as it is known to exceed
/// [`BODY_LIMIT`]. On error the caller still owns `body` (to drain it).
pub async fn read_body(
    body: &mut Body,
    declared: Option<u64>,
    deadline: Instant,
) -> Result<Bytes, BodyError> {
    if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        return Err(BodyError::TooLarge);
    }
    let capacity = declared.map_or(0, |n| usize::try_from(n).unwrap_or(BODY_LIMIT));
    let mut buf = Vec::with_capacity(capacity.min(BODY_LIMIT));
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| BodyError::Broken)?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > BODY_LIMIT {
                    return Err(BodyError::TooLarge);
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(())
    };
    match tokio::time::timeout_at(deadline, read).await {
        Ok(Ok(())) => Ok(Bytes::from(buf)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(BodyError::TooSlow),
    }
}

/// Reads and discards what is left of a refused body (at most [`DRAIN_LIMIT`] bytes for
/// at most [`DRAIN_TIME`]) in the background, so a client that sends its whole body
/// before reading (urllib, boto3) reads the refusal instead of a reset connection.
pub fn drain(mut body: Body) {
    tokio::spawn(async move {
        let discard = async {
            let mut seen = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data() {
                    seen += data.len() as u64;
                    if seen > DRAIN_LIMIT {
                        break;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIME, discard).await;
    });
}

/// Open connections per peer address and in total.
#[derive(Debug)]
pub struct ConnectionLimits {
    per_peer: usize,
    total_cap: usize,
    total: AtomicUsize,
    by_peer: Mutex<HashMap<IpAddr, usize>>,
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionRefused {
    /// The peer address holds its share already.
    #[error("peer is over its connection cap")]
    PeerCap,
    /// The server holds its total already.
    #[error("server is over its connection cap")]
    TotalCap,
}

impl ConnectionRefused {
    /// Which cap refused it (the `reason` label of
    /// `kms_connections_refused_total`).
    pub fn reason(self) -> &'static str {
        match self {
            Self::PeerCap => "peer_cap",
            Self::TotalCap => "total_cap",
        }
    }
}

/// One admitted connection; its slot is released on drop.
#[derive(Debug)]
pub struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    peer: IpAddr,
}

impl ConnectionLimits {
    /// Caps of `per_peer` connections per address and `total` in all.
    pub fn new(per_peer: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            per_peer,
            total_cap: total,
            total: AtomicUsize::new(0),
            by_peer: Mutex::new(HashMap::new()),
        })
    }

    /// Admits a connection from `peer`, or says which cap it would exceed.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<ConnectionSlot, ConnectionRefused> {
        let mut by_peer = self.by_peer.lock().unwrap_or_else(PoisonError::into_inner);
        if self.total.load(Ordering::Relaxed) >= self.total_cap {
            return Err(ConnectionRefused::TotalCap);
        }
        let n = by_peer.entry(peer).or_insert(0);
        if *n >= self.per_peer {
            return Err(ConnectionRefused::PeerCap);
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(ConnectionSlot {
            limits: self.clone(),
            peer,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut by_peer = self
            .limits
            .by_peer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                by_peer.remove(&self.peer);
            }
        }
        self.limits.total.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_grow_with_length_and_are_capped() {
        assert_eq!(body_deadline(Some(0)), BODY_BASE_DEADLINE);
        assert_eq!(
            body_deadline(Some(BODY_MIN_RATE)),
            BODY_BASE_DEADLINE + Duration::from_secs(1)
        );
        assert_eq!(body_deadline(Some(u64::MAX)), BODY_MAX_DEADLINE);
        assert_eq!(body_deadline(None), BODY_MAX_DEADLINE);
    }

    #[test]
    fn peers_are_capped_separately_and_slots_come_back() {
        let limits = ConnectionLimits::new(2, 3);
        let a: IpAddr = [127, 0, 0, 2].into();
        let b: IpAddr = [127, 0, 0, 3].into();
        let a1 = limits.admit(a).expect("first");
        let _a2 = limits.admit(a).expect("second");
        assert_eq!(limits.admit(a).err(), Some(ConnectionRefused::PeerCap));
        let _b1 = limits.admit(b).expect("other peer");
        assert_eq!(limits.admit(b).err(), Some(ConnectionRefused::TotalCap));
        drop(a1);
        assert_eq!(limits.open(), 2);
        limits.admit(a).expect("slot released");
    }

    #[tokio::test]
    async fn bodies_are_refused_by_declared_length_size_and_deadline() {
        let mut big = Body::from(vec![0u8; 10]);
        let far = Instant::now() + Duration::from_secs(5);
        assert_eq!(
            read_body(&mut big, Some(BODY_LIMIT as u64 + 1), far).await,
            Err(BodyError::TooLarge)
        );
        let mut streamed = Body::from(vec![0u8; BODY_LIMIT + 1]);
        assert_eq!(
            read_body(&mut streamed, None, far).await,
            Err(BodyError::TooLarge)
        );
        let mut ok = Body::from(&b"{}"[..]);
        assert_eq!(
            read_body(&mut ok, Some(2), far).await,
            Ok(Bytes::from_static(b"{}"))
        );
        let mut stalled = Body::new(Stalled);
        let soon = Instant::now() + Duration::from_millis(50);
        assert_eq!(
            read_body(&mut stalled, Some(10), soon).await,
            Err(BodyError::TooSlow)
        );
    }

    /// A body whose client never sends another byte.
    struct Stalled;

    impl axum::body::HttpBody for Stalled {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
            std::task::Poll::Pending
        }
    }
}
