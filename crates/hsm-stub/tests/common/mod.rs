//! Helpers shared by the integration tests of hsm-stub.

/// Seals `body` the way every value is sealed: magic, version 1, body, CRC.
pub fn seal(magic: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut v = magic.to_vec();
    v.push(1);
    v.extend_from_slice(body);
    let crc = crc32fast::hash(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}
