//! LUKS2 header parser: `Header::read` on arbitrary bytes. The first input byte picks a
//! mode: bit 0 reseals the checksums (so mutations reach the binary-field checks and the
//! JSON parser), bit 1 declares the backing 80 MiB long (so segments fit and the header
//! is accepted), else the backing is exactly the input. Oracle: never a panic; an
//! accepted header answers every accessor, and one that `write` accepts reads back with
//! the same identity and a higher seqid.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealvol::luks2::{Header, is_luks, journal_area};
use sealvol_fuzz::{SparseBacking, reseal};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, image)) = data.split_first() else { return };
    let mut image = image.to_vec();
    if mode & 1 != 0 {
        reseal(&mut image);
    }
    let size = if mode & 2 != 0 { 80 << 20 } else { image.len() as u64 };
    let backing = SparseBacking::new(image, size);
    let _ = is_luks(&backing);
    let Ok(mut h) = Header::read(&backing) else { return };
    let _ = (h.uuid(), h.label(), h.cipher(), h.sector_size(), h.hdr_size());
    let _ = (h.keyslot_count(), h.mandatory_requirements(), h.which_copy_used());
    let _ = (h.data_offset(), h.data_size(size), h.data_size(0), h.data_size(u64::MAX));
    let j = journal_area(&h);
    assert!(j.start <= j.end, "journal area {j:?}");
    let token = h.kms_token().cloned();
    let (uuid, seqid) = (h.uuid().to_owned(), h.seqid());
    if h.write(&backing).is_ok() {
        let again = Header::read(&backing).expect("a header write accepted must read back");
        assert_eq!(again.uuid(), uuid);
        assert!(again.seqid() > seqid);
        assert_eq!(again.kms_token().cloned(), token);
        assert_eq!(again.sector_size(), h.sector_size());
        assert_eq!(again.data_offset(), h.data_offset());
    }
});
