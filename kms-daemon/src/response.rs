//! Responses as the KMS JSON 1.1 protocol sends them. Bodies are serialized into a
//! buffer of exactly the right size (no reallocation leaves a copy behind) that is
//! wiped when hyper is done with it, and the strings of the serialized
//! [`serde_json::Value`] are wiped too: responses carrying `Plaintext` leave no copies
//! in freed memory.

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};
use zeroize::Zeroize;

/// A response body wiped on drop.
#[derive(Default)]
pub struct WipedOnDrop(Vec<u8>);

impl std::fmt::Debug for WipedOnDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WipedOnDrop({} bytes)", self.0.len())
    }
}

impl AsRef<[u8]> for WipedOnDrop {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for WipedOnDrop {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// A writer that never leaves a copy behind when it grows: the old buffer is wiped
/// after its bytes are moved to the larger one.
struct WipingWriter(WipedOnDrop);

impl std::io::Write for WipingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let v = &mut self.0.0;
        if v.len() + buf.len() > v.capacity() {
            let mut bigger = Vec::with_capacity((v.len() + buf.len()).max(v.capacity() * 2));
            bigger.extend_from_slice(v);
            // The old buffer is wiped by WipedOnDrop when replaced.
            drop(std::mem::replace(&mut self.0, WipedOnDrop(bigger)));
        }
        self.0.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// First capacity of a response body (most responses fit).
const INITIAL_BODY_CAPACITY: usize = 1024;

/// Serializes `v` into a [`WipedOnDrop`] buffer; growing it wipes the smaller one.
pub fn serialize_wiped(v: &Value) -> WipedOnDrop {
    let mut w = WipingWriter(WipedOnDrop(Vec::with_capacity(INITIAL_BODY_CAPACITY)));
    // Writing a Value (string keys) to an infallible writer cannot fail.
    if serde_json::to_writer(&mut w, v).is_err() {
        return WipedOnDrop::default();
    }
    w.0
}

/// Zeroizes every string in `v` (values, not object keys, which are field names).
pub fn wipe_strings(v: &mut Value) {
    match v {
        Value::String(s) => s.zeroize(),
        Value::Array(a) => a.iter_mut().for_each(wipe_strings),
        Value::Object(m) => m.values_mut().for_each(wipe_strings),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

fn with_headers(mut r: Response, request_id: &str) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-amz-json-1.1"),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("x-amzn-requestid", v);
    }
    r
}

/// A successful operation's response; `v` is wiped once serialized.
pub fn secret_json(mut v: Value, request_id: &str) -> Response {
    let body = serialize_wiped(&v);
    wipe_strings(&mut v);
    let mut r = Response::new(Body::from(Bytes::from_owner(body)));
    *r.status_mut() = StatusCode::OK;
    with_headers(r, request_id)
}

/// A JSON response without secrets.
pub fn json_response(status: StatusCode, body: &Value, request_id: &str) -> Response {
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = status;
    with_headers(r, request_id)
}

/// The AWS error code an error response carries, kept beside it as a response
/// extension so the server can count outcomes without parsing bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode(pub &'static str);

/// `{"__type": code, "message": message}` with `status` (and `code` as an
/// [`ErrorCode`] extension).
pub fn error_response(
    status: u16,
    code: &'static str,
    message: &str,
    request_id: &str,
) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = json_response(
        status,
        &json!({"__type": code, "message": message}),
        request_id,
    );
    r.extensions_mut().insert(ErrorCode(code));
    r
}

/// [`error_response`] that also closes the connection (the request body was refused
/// and may not have been read).
pub fn closing_error_response(
    status: u16,
    code: &'static str,
    message: &str,
    request_id: &str,
) -> Response {
    let mut r = error_response(status, code, message, request_id);
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_round_trip_and_values_are_wiped() {
        let mut v =
            json!({"KeyId": "k", "Plaintext": "c2VjcmV0", "List": ["a", {"b": "c"}], "n": 1});
        let body = serialize_wiped(&v);
        assert_eq!(
            serde_json::from_slice::<Value>(body.as_ref()).expect("json"),
            v
        );
        wipe_strings(&mut v);
        assert_eq!(
            v,
            json!({"KeyId": "", "Plaintext": "", "List": ["", {"b": ""}], "n": 1})
        );
    }

    #[test]
    fn large_bodies_grow_correctly() {
        let big = json!({"Plaintext": "A".repeat(10_000), "K": vec!["x"; 100]});
        let body = serialize_wiped(&big);
        assert_eq!(
            serde_json::from_slice::<Value>(body.as_ref()).expect("json"),
            big
        );
    }

    #[tokio::test]
    async fn secret_responses_carry_the_body() {
        use http_body_util::BodyExt;
        let r = secret_json(json!({"Plaintext": "AAAA"}), "rid");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["x-amzn-requestid"], "rid");
        let body = r.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], br#"{"Plaintext":"AAAA"}"#);
    }
}
