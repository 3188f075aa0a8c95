//! The real `cryptsetup` as the oracle for sealvol's LUKS2 headers (DESIGN §4, §8):
//! `isLuks` and `luksDump` accept our files and show our token; `luksAddKey
//! --volume-key-file` accepts the right volume key and rejects a wrong one; and our parser
//! reads (and rewrites without loss) what `cryptsetup luksFormat` wrote.
//!
//! Without `cryptsetup` the tests skip with a printed reason, except under `CI=true`,
//! where a missing tool is a failure (`apt-get install -y cryptsetup-bin`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sealvol::backing::{Backing, FileBacking};
use sealvol::luks2::{self, Copy, FormatParams, Header, KmsToken, Luks2Error};
use sealvol::secret::VolumeKey;

/// The cryptsetup binary, or `None` (skip) outside CI.
fn cryptsetup() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join("cryptsetup"))
        .find(|p| p.is_file());
    if found.is_none() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "cryptsetup is missing and CI=true: install it (apt-get install -y cryptsetup-bin)"
        );
        eprintln!(
            "SKIP: cryptsetup not found (apt-get install -y cryptsetup-bin); not under CI=true, so skipping"
        );
    }
    found
}

struct Cs(PathBuf);

impl Cs {
    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new(&self.0)
            .args(args)
            .output()
            .expect("cryptsetup runs");
        eprintln!(
            "cryptsetup {}: {}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "cryptsetup {args:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn token() -> KmsToken {
    KmsToken {
        key_arn: "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
            .into(),
        ciphertext_blob: b"AQIDAHh-wrapped-data-key".to_vec(),
        encryption_context: [
            (
                "aws:workspaces:sid-directoryid",
                "S-1-5-21-1111-2222-3333-1001@d-1234567890",
            ),
            ("aws:ebs:id", "vol-0123456789abcdef0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        volume_kind: "user".into(),
        volume_id: "vol-0123456789abcdef0".into(),
        workspace_id: "ws-0123456789".into(),
    }
}

fn write_key(path: &Path, key: &VolumeKey) {
    std::fs::write(path, key.expose()).expect("write key file");
}

/// Formats a sealvol volume at `dir/vol` and writes its key to `dir/right.key`.
fn sealvol_volume(dir: &Path, sector_size: u32) -> (PathBuf, PathBuf, Header) {
    let vol = dir.join("vol");
    let key_path = dir.join("right.key");
    let key = VolumeKey::generate();
    write_key(&key_path, &key);
    let params = FormatParams {
        data_size: 4 * 1024 * 1024,
        sector_size,
        label: "sealvol-test".into(),
        token: Some(token()),
    };
    let b = FileBacking::create(&vol, false).expect("create");
    let h = Header::format(&b, &key, &params).expect("format");
    (vol, key_path, h)
}

#[test]
fn isluks_and_luksdump_accept_our_headers_and_show_the_token() {
    let Some(cs) = cryptsetup().map(Cs) else {
        return;
    };
    for sector in [4096, 512] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vol, _, h) = sealvol_volume(dir.path(), sector);
        cs.ok(&["isLuks", "--type", "luks2", s(&vol)]);
        let dump = cs.ok(&["luksDump", s(&vol)]);
        assert!(
            dump.contains(&format!("UUID:          \t{}", h.uuid())),
            "{dump}"
        );
        assert!(dump.contains("Label:         \tsealvol-test"), "{dump}");
        assert!(dump.contains("cipher: aes-xts-plain64"), "{dump}");
        assert!(
            dump.contains(&format!("sector: {sector} [bytes]")),
            "{dump}"
        );
        assert!(dump.contains("offset: 16777216 [bytes]"), "{dump}");
        assert!(dump.contains("length: 4194304 [bytes]"), "{dump}");
        assert!(dump.contains("0: sealvol-kms"), "token listed: {dump}");
        assert!(dump.contains("0: pbkdf2"), "digest listed: {dump}");
        let json = cs.ok(&["luksDump", "--dump-json-metadata", s(&vol)]);
        let v: serde_json::Value = serde_json::from_str(&json).expect("cryptsetup prints JSON");
        assert_eq!(v["tokens"]["0"]["type"], "sealvol-kms");
        assert_eq!(v["tokens"]["0"]["volume_id"], "vol-0123456789abcdef0");
        assert_eq!(uuid_of(&cs, &vol), h.uuid());
    }
}

fn uuid_of(cs: &Cs, vol: &Path) -> String {
    cs.ok(&["luksUUID", s(vol)]).trim().to_string()
}

#[test]
fn cryptsetup_reads_our_secondary_copy_when_the_primary_is_damaged() {
    let Some(cs) = cryptsetup().map(Cs) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (vol, _, h) = sealvol_volume(dir.path(), 4096);
    let b = FileBacking::open(&vol).expect("open");
    let mut byte = [0u8];
    b.read_at(&mut byte, 4096 + 7).expect("read");
    byte[0] ^= 0x20;
    b.write_at(&byte, 4096 + 7).expect("write");
    assert_eq!(
        Header::read(&b).expect("secondary").which_copy_used(),
        Copy::Secondary
    );
    // cryptsetup validates our secondary copy on its own (and may repair the primary).
    let dump = cs.ok(&["luksDump", s(&vol)]);
    assert!(dump.contains(h.uuid()), "{dump}");
    assert!(dump.contains("sealvol-kms"), "{dump}");
}

#[test]
fn luks_add_key_accepts_the_right_volume_key_and_rejects_a_wrong_one() {
    let Some(cs) = cryptsetup().map(Cs) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (vol, right, h) = sealvol_volume(dir.path(), 4096);
    let wrong = dir.path().join("wrong.key");
    write_key(&wrong, &VolumeKey::generate());
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "correct horse battery staple").expect("write passphrase");
    let add = |key: &Path| {
        cs.run(&[
            "luksAddKey",
            "--batch-mode",
            "--key-size",
            "512",
            "--volume-key-file",
            s(key),
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--new-keyfile",
            s(&pass),
            s(&vol),
        ])
    };

    let refused = add(&wrong);
    assert!(
        !refused.status.success(),
        "a wrong volume key must be rejected"
    );
    let after_refusal = Header::read(&FileBacking::open(&vol).expect("open")).expect("read");
    assert_eq!(
        (after_refusal.seqid(), after_refusal.keyslot_count()),
        (h.seqid(), 0),
        "header untouched"
    );

    assert!(
        add(&right).status.success(),
        "the right volume key must be accepted"
    );
    cs.ok(&["open", "--test-passphrase", "--key-file", s(&pass), s(&vol)]);
    // The new keyslot holds exactly our volume key.
    let exported = dir.path().join("exported.key");
    cs.ok(&[
        "luksDump",
        "--batch-mode",
        "--dump-volume-key",
        "--key-file",
        s(&pass),
        "--volume-key-file",
        s(&exported),
        s(&vol),
    ]);
    assert_eq!(
        std::fs::read(&exported).expect("exported"),
        std::fs::read(&right).expect("right")
    );

    // We read what cryptsetup wrote, keep its keyslot, and cryptsetup still uses it after
    // our rewrite.
    let b = FileBacking::open(&vol).expect("open");
    let mut h2 = Header::read(&b).expect("read after luksAddKey");
    assert_eq!(h2.uuid(), h.uuid());
    assert_eq!(h2.keyslot_count(), 1);
    assert!(h2.seqid() > h.seqid());
    assert_eq!(h2.kms_token(), Some(&token()));
    let key = VolumeKey::from_file(&right).expect("key");
    h2.verify_key(&key).expect("right key");
    assert!(
        luks2::journal_area(&h2).start >= 32768 + 258_048,
        "journal avoids the keyslot"
    );
    let mut t = token();
    t.key_arn = "arn:aws:kms:us-east-1:111122223333:key/rewrapped".into();
    h2.set_kms_token(t);
    h2.write(&b).expect("write");
    cs.ok(&["open", "--test-passphrase", "--key-file", s(&pass), s(&vol)]);
    assert!(
        cs.ok(&["luksDump", s(&vol)])
            .contains("Keyslots:\n  0: luks2")
    );
    let json = cs.ok(&["luksDump", "--dump-json-metadata", s(&vol)]);
    assert!(json.contains("key/rewrapped"), "{json}");
}

#[test]
fn we_read_and_rewrite_headers_that_cryptsetup_luksformat_wrote() {
    let Some(cs) = cryptsetup().map(Cs) else {
        return;
    };
    let bigger_metadata = [
        "--luks2-metadata-size",
        "64k",
        "--luks2-keyslots-size",
        "1m",
    ];
    for (sector, extra) in [("4096", &[][..]), ("512", &bigger_metadata[..])] {
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = dir.path().join("cs.img");
        std::fs::File::create(&vol)
            .expect("create")
            .set_len(20 << 20)
            .expect("size");
        let key_path = dir.path().join("vk");
        let key = VolumeKey::generate();
        write_key(&key_path, &key);
        let pass = dir.path().join("pass");
        std::fs::write(&pass, "passphrase").expect("write");
        let mut args = extra.to_vec();
        args.extend([
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--sector-size",
            sector,
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-size",
            "512",
            "--volume-key-file",
            s(&key_path),
            "--label",
            "made-by-cryptsetup",
            "--key-file",
            s(&pass),
            s(&vol),
        ]);
        cs.ok(&args);
        let before: serde_json::Value =
            serde_json::from_str(&cs.ok(&["luksDump", "--dump-json-metadata", s(&vol)]))
                .expect("json");

        let b = FileBacking::open(&vol).expect("open");
        let mut h = Header::read(&b).expect("our parser reads cryptsetup's header");
        assert_eq!(h.uuid(), uuid_of(&cs, &vol));
        assert_eq!(h.label(), "made-by-cryptsetup");
        assert_eq!(h.cipher(), "aes-xts-plain64");
        assert_eq!(h.sector_size().to_string(), sector);
        let number = |v: &serde_json::Value| v.as_str().and_then(|n| n.parse::<u64>().ok());
        let offset = number(&before["segments"]["0"]["offset"]).expect("segment offset");
        let json_size = number(&before["config"]["json_size"]).expect("json_size");
        assert_eq!(h.hdr_size(), json_size + 4096);
        assert_eq!(h.data_offset(), offset);
        assert_eq!(
            h.data_size(b.size().expect("size")),
            (20 << 20) - offset,
            "\"dynamic\" segment size"
        );
        assert_eq!(h.keyslot_count(), 1);
        assert_eq!(h.kms_token(), None);
        h.verify_key(&key)
            .expect("cryptsetup's digest accepts the right key");
        let wrong = h.verify_key(&VolumeKey::generate()).expect_err("wrong key");
        assert!(matches!(wrong, Luks2Error::DigestMismatch), "{wrong}");

        let seqid = h.seqid();
        h.set_kms_token(token());
        h.write(&b).expect("write");
        let dump = cs.ok(&["luksDump", s(&vol)]);
        assert!(
            dump.contains(&format!("Epoch:         \t{}", seqid + 1)),
            "{dump}"
        );
        assert!(dump.contains("0: sealvol-kms"), "{dump}");
        cs.ok(&["open", "--test-passphrase", "--key-file", s(&pass), s(&vol)]);
        let mut after: serde_json::Value =
            serde_json::from_str(&cs.ok(&["luksDump", "--dump-json-metadata", s(&vol)]))
                .expect("json");
        after["tokens"] = before["tokens"].clone();
        assert_eq!(after, before, "our rewrite changed nothing but the token");
    }
}
