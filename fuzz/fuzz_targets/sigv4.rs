//! SigV4 header parsing and verification. Input: newline-separated Authorization,
//! X-Amz-Date, X-Amz-Target, forward-access token, extra header value, body; the first byte's
//! bits choose whether to sign the request correctly with an independent signer and a
//! clock skew. Oracle: never a panic; a correctly signed request with well-formed
//! headers verifies; a request signed with another secret never does.
#![no_main]

use std::sync::OnceLock;

use kms_daemon::clock::{iso8601, parse_amz_date};
use kms_daemon::principal::Principal;
use kms_daemon::forward::FORWARD_ACCESS;
use kms_daemon::sigv4::{Verifier, presented_access_key};
use libfuzzer_sys::fuzz_target;
use sealvol_fuzz::{fields, sigv4_authorization};

const HOST: &str = "127.0.0.1:4599";

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let p = |s: &str| Principal::parse(s).expect("valid principal");
        Verifier::new("us-east-1", "111122223333", [
            ("AKIDADMIN".to_owned(), "secretadmin".to_owned(), p("arn:aws:iam::111122223333:root")),
            ("AKIDEBS".to_owned(), "secretebs".to_owned(), Principal::Service("ebs.amazonaws.com".into())),
        ])
    })
}

fn plain(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|c| (0x21..0x7f).contains(&c))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let f = fields(rest, b'\n', 6);
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let (auth, date, target, fwd, extra, body) = (s(f[0]), s(f[1]), s(f[2]), s(f[3]), s(f[4]), f[5]);
    if let Some(t) = parse_amz_date(&date) {
        let again = iso8601(t).replace(['-', ':'], "");
        assert_eq!(parse_amz_date(&again), Some(t), "{date} -> {t} -> {again}");
    }
    let signing = mode & 1 != 0;
    let service = mode & 2 != 0;
    let skew = i64::from((mode >> 2) & 0x3f) * 10 - 300;
    let mut hs: Vec<(String, String)> = vec![("host".into(), HOST.into()), ("x-amz-date".into(), date.clone())];
    for (name, v) in [("x-amz-target", &target), (FORWARD_ACCESS, &fwd), ("x-fuzz", &extra)] {
        if !v.is_empty() {
            hs.push((name.to_owned(), v.clone()));
        }
    }
    let (ak, sk) = if service { ("AKIDEBS", "secretebs") } else { ("AKIDADMIN", "secretadmin") };
    let authorization = if signing { sigv4_authorization(&hs, body, ak, sk, "us-east-1") } else { auth };
    let mut b = http::Request::builder().method("POST").uri("/");
    for (n, v) in &hs {
        b = b.header(n.as_str(), v.as_str());
    }
    b = b.header("authorization", authorization.as_str());
    let Ok(req) = b.body(()) else { return };
    let (parts, ()) = req.into_parts();
    let _ = presented_access_key(&parts.headers);
    let now = parse_amz_date(&date).unwrap_or(0).saturating_add(skew);
    let r = verifier().verify(&parts, body, now);
    // Real clocks are after 1970: the daemon refuses pre-epoch timestamps (found by this
    // target; seeds/sigv4/regress-pre-epoch-date).
    let well_formed = hs.iter().all(|(_, v)| plain(v)) && parse_amz_date(&date).is_some_and(|t| t >= 0) && date.len() == 16;
    if signing && well_formed && skew.abs() <= 300 {
        // No fuzzed token can carry a user's signature, and neither signer here is the
        // forwarding service: any forward-access header must be refused.
        if fwd.is_empty() {
            let c = r.expect("a correctly signed, well-formed request must verify");
            assert_eq!(c.access_key_id, ak);
            assert!(c.forwarded.is_none());
        } else {
            assert!(r.is_err(), "a forward-access token must be refused: {fwd:?}");
        }
        // The same request signed with a wrong secret never verifies.
        let forged = sigv4_authorization(&hs, body, ak, "wrong", "us-east-1");
        let mut parts2 = parts.clone();
        parts2.headers.insert("authorization", forged.parse().expect("ascii"));
        assert!(verifier().verify(&parts2, body, now).is_err());
    }
});
