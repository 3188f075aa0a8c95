//! Identifier formats: `ws-…`, `vol-…`, `snap-…`, `wsi-…`, `d-…`, `wsb-…`, and SIDs.

use sha2::Digest;

fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n.div_ceil(2)];
    rand::fill(&mut bytes[..]);
    let mut s = hex::encode(bytes);
    s.truncate(n);
    s
}

/// A new WorkSpace id (`ws-` + 9 lowercase alphanumerics, as AWS prints them).
#[must_use]
pub fn workspace_id() -> String {
    format!("ws-{}", random_hex(9))
}

/// A new EBS volume id (`vol-` + 17 hex digits).
#[must_use]
pub fn volume_id() -> String {
    format!("vol-{}", random_hex(17))
}

/// A new snapshot id.
#[must_use]
pub fn snapshot_id() -> String {
    format!("snap-{}", random_hex(17))
}

/// A new image id.
#[must_use]
pub fn image_id() -> String {
    format!("wsi-{}", random_hex(9))
}

/// Whether `id` looks like a directory id (`d-` + 10 hex digits).
#[must_use]
pub fn is_directory_id(id: &str) -> bool {
    id.strip_prefix("d-")
        .is_some_and(|h| h.len() == 10 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether `id` looks like a bundle id (`wsb-` + alphanumerics).
#[must_use]
pub fn is_bundle_id(id: &str) -> bool {
    id.strip_prefix("wsb-")
        .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Whether a user name is acceptable (like AD sAMAccountName: 1–63 of `[A-Za-z0-9._-]`).
#[must_use]
pub fn is_user_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The domain SID of a directory: `S-1-5-21-a-b-c`, derived from its id so that it is
/// stable across registrations.
#[must_use]
pub fn domain_sid(directory_id: &str) -> String {
    let d = sha2::Sha256::digest(directory_id.as_bytes());
    let part = |i: usize| u32::from_be_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
    format!("S-1-5-21-{}-{}-{}", part(0), part(4), part(8))
}

/// The SID of a user: the directory's domain SID plus a RID derived from the name, so the
/// same user always gets the same SID (RIDs start at 1000, as for ordinary accounts).
#[must_use]
pub fn user_sid(directory_id: &str, user_name: &str) -> String {
    let d = sha2::Sha256::digest(format!("{directory_id}/{user_name}").as_bytes());
    let rid = 1000 + u32::from_be_bytes([d[0], d[1], d[2], d[3]]) % 1_000_000_000;
    format!("{}-{rid}", domain_sid(directory_id))
}

/// Whether `sid` has the form `S-1-5-21-a-b-c-RID`.
#[must_use]
pub fn is_sid(sid: &str) -> bool {
    let Some(rest) = sid.strip_prefix("S-1-5-21-") else {
        return false;
    };
    let parts: Vec<&str> = rest.split('-').collect();
    parts.len() == 4
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 10 && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert!(workspace_id().starts_with("ws-") && workspace_id().len() == 12);
        assert_eq!(volume_id().len(), 21);
        assert!(
            is_directory_id("d-906734f0a1")
                && !is_directory_id("d-xyz")
                && !is_directory_id("906734f0a1")
        );
        assert!(is_bundle_id("wsb-clj85qzj1") && !is_bundle_id("wsb-") && !is_bundle_id("bundle"));
        assert_eq!(domain_sid("d-906734f0a1"), domain_sid("d-906734f0a1"));
        assert_ne!(domain_sid("d-906734f0a1"), domain_sid("d-906734f0a2"));
        assert!(is_sid(&format!("{}-1001", domain_sid("d-906734f0a1"))));
        assert_eq!(
            user_sid("d-906734f0a1", "alice"),
            user_sid("d-906734f0a1", "alice")
        );
        assert_ne!(
            user_sid("d-906734f0a1", "alice"),
            user_sid("d-906734f0a1", "bob")
        );
        assert!(is_sid(&user_sid("d-906734f0a1", "alice")));
        assert!(!is_sid("S-1-5-21-1-2-1001") && !is_sid("S-1-5-21-1-2-3-x"));
        assert!(is_user_name("alice.smith") && !is_user_name("a b") && !is_user_name(""));
    }
}
