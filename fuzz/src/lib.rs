//! Shared pieces of the fuzz targets: a sparse in-memory [`Backing`] (a LUKS2 header
//! needs a 16 MiB+ backing that must not cost 16 MiB per execution), a LUKS2 checksum
//! "fixup" so that mutated header bytes get past the SHA-256 check and reach the JSON
//! parser, and an independent SigV4 signer (from the spec, not the `aws-sigv4` crate the
//! daemon verifies with) so a correctly signed request is an oracle.

use std::sync::Mutex;

use hmac::{Hmac, KeyInit, Mac};
use sealvol::backing::{Backing, BackingError};
use sha2::{Digest, Sha256};

/// A backing of a declared size whose bytes past `stored.len()` read as zeros.
#[derive(Debug)]
pub struct SparseBacking {
    inner: Mutex<(Vec<u8>, u64)>,
}

impl SparseBacking {
    /// `bytes` at offset 0, declared size `max(size, bytes.len())`.
    pub fn new(bytes: Vec<u8>, size: u64) -> Self {
        let size = size.max(bytes.len() as u64);
        Self { inner: Mutex::new((bytes, size)) }
    }

    /// The stored prefix.
    pub fn bytes(&self) -> Vec<u8> {
        self.inner.lock().expect("not poisoned").0.clone()
    }
}

fn truncated(offset: u64, len: usize, size: u64) -> BackingError {
    BackingError::Truncated { path: "sparse".into(), offset, len: len as u64, size }
}

impl Backing for SparseBacking {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackingError> {
        let g = self.inner.lock().expect("not poisoned");
        let (bytes, size) = (&g.0, g.1);
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= size => {}
            _ => return Err(truncated(offset, buf.len(), size)),
        }
        buf.fill(0);
        let stored = bytes.len() as u64;
        if offset < stored {
            let start = offset as usize;
            let n = buf.len().min(bytes.len() - start);
            buf[..n].copy_from_slice(&bytes[start..start + n]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BackingError> {
        let mut g = self.inner.lock().expect("not poisoned");
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= 64 << 20)
            .ok_or_else(|| truncated(offset, buf.len(), g.1))?;
        let end_us = end as usize;
        if g.0.len() < end_us {
            g.0.resize(end_us, 0);
        }
        g.0[offset as usize..end_us].copy_from_slice(buf);
        g.1 = g.1.max(end);
        Ok(())
    }

    fn flush(&self) -> Result<(), BackingError> {
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        let mut g = self.inner.lock().expect("not poisoned");
        let stored = g.0.len() as u64;
        let start = offset.min(stored) as usize;
        let end = offset.saturating_add(len).min(stored) as usize;
        g.0[start..end].fill(0);
        Ok(())
    }

    fn size(&self) -> Result<u64, BackingError> {
        Ok(self.inner.lock().expect("not poisoned").1)
    }

    fn set_size(&self, size: u64) -> Result<(), BackingError> {
        let mut g = self.inner.lock().expect("not poisoned");
        if (g.0.len() as u64) > size {
            g.0.truncate(size as usize);
        }
        g.1 = size;
        Ok(())
    }

    fn name(&self) -> String {
        "sparse".into()
    }
}

/// LUKS2 header sizes (16 KiB .. 4 MiB).
pub const HDR_SIZES: [u64; 9] = [
    0x4000, 0x8000, 0x1_0000, 0x2_0000, 0x4_0000, 0x8_0000, 0x10_0000, 0x20_0000, 0x40_0000,
];

/// Recomputes the SHA-256 checksum (LUKS2 spec: over `hdr_size` bytes with the 64-byte
/// checksum field at 448 zeroed, stored in its first 32 bytes) of every header copy in
/// `image` whose magic and declared size fit: the primary at 0 and a secondary at its
/// declared size. Mutated headers then get past the checksum to the JSON parser.
pub fn reseal(image: &mut [u8]) {
    let mut offsets = vec![0u64];
    if image.len() >= 16 {
        let declared = u64::from_be_bytes(image[8..16].try_into().expect("8 bytes"));
        if HDR_SIZES.contains(&declared) {
            offsets.push(declared);
        }
    }
    for off in offsets {
        let Ok(off) = usize::try_from(off) else { continue };
        let Some(head) = image.get(off..off + 16) else { continue };
        let size = u64::from_be_bytes(head[8..16].try_into().expect("8 bytes"));
        if !HDR_SIZES.contains(&size) {
            continue;
        }
        let Some(copy) = image.get_mut(off..off + size as usize) else { continue };
        copy[448..512].fill(0);
        let sum = Sha256::digest(&*copy);
        copy[448..480].copy_from_slice(&sum);
    }
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(msg);
    m.finalize().into_bytes().to_vec()
}

/// Signs a `POST /` request per the SigV4 spec; `headers` are (lower-case name, value)
/// and must include `host` and `x-amz-date`. Returns the Authorization header value.
pub fn sigv4_authorization(
    headers: &[(String, String)],
    body: &[u8],
    access_key: &str,
    secret: &str,
    region: &str,
) -> String {
    let mut hs: Vec<(String, String)> = headers.to_vec();
    hs.sort();
    let amz_date = hs
        .iter()
        .find(|(n, _)| n == "x-amz-date")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let canonical_headers: String = hs
        .iter()
        .map(|(n, v)| format!("{n}:{}\n", v.split_whitespace().collect::<Vec<_>>().join(" ")))
        .collect();
    let signed: Vec<&str> = hs.iter().map(|(n, _)| n.as_str()).collect();
    let signed = signed.join(";");
    let creq = format!(
        "POST\n/\n\n{canonical_headers}\n{signed}\n{}",
        hex::encode(Sha256::digest(body))
    );
    let date = amz_date.get(..8).unwrap_or("");
    let scope = format!("{date}/{region}/kms/aws4_request");
    let sts = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(creq.as_bytes()))
    );
    let mut k = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    for part in [region, "kms", "aws4_request"] {
        k = hmac(&k, part.as_bytes());
    }
    let sig = hex::encode(hmac(&k, sts.as_bytes()));
    format!("AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed}, Signature={sig}")
}

/// Splits fuzz input into `n` fields separated by `sep` (missing fields are empty).
pub fn fields(data: &[u8], sep: u8, n: usize) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = data.splitn(n, |&b| b == sep).collect();
    out.resize(n, &[]);
    out
}
