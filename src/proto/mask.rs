//! Payload masking (RFC 6455 section 5.3).
//!
//! This module owns the XOR masking applied to every client-to-server payload. Masking is an
//! involution (masking twice restores the data), so the same functions unmask. Both functions
//! take the payload offset of `buf[0]` so that a payload can be (un)masked in pieces, e.g. as
//! it trickles in over several reads.
//!
//! [`apply_mask`] is the hot-path version: it works 8 bytes at a time with a 64-bit key,
//! which the compiler turns into SIMD code, without any `unsafe`. [`apply_mask_scalar`] is the
//! obvious byte-by-byte reference used to test it.

/// XOR `buf` with `key`, where `buf[0]` is payload byte number `offset` (so masking can resume
/// mid-frame). Word-wise and fast; equivalent to [`apply_mask_scalar`].
#[inline]
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], offset: usize) {
    // Rotate the key so that `key[0]` applies to `buf[0]`.
    let key = rotate_key(key, offset);
    if buf.len() < 8 {
        xor_bytes(buf, key);
        return;
    }
    // Two copies of the 4-byte key form one 64-bit word; because 8 is a multiple of 4 the
    // phase is the same at the start of every 8-byte chunk.
    let key64 = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let masked = u64::from_ne_bytes(word) ^ key64;
        chunk.copy_from_slice(&masked.to_ne_bytes());
    }
    // The tail (< 8 bytes) also starts at a multiple of 8, hence with phase 0.
    xor_bytes(chunks.into_remainder(), key);
}

/// XOR `buf` with `key`, byte by byte, where `buf[0]` is payload byte number `offset`.
/// The reference implementation for [`apply_mask`].
pub fn apply_mask_scalar(buf: &mut [u8], key: [u8; 4], offset: usize) {
    // `offset & 3` keeps the addition from overflowing for any offset.
    let phase = offset & 3;
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte ^= key[(phase + i) & 3];
    }
}

/// The key as seen from payload byte `offset`.
#[inline]
fn rotate_key(key: [u8; 4], offset: usize) -> [u8; 4] {
    let mut rotated = key;
    rotated.rotate_left(offset & 3);
    rotated
}

/// XOR with an already-rotated key, phase 0 at `buf[0]`.
#[inline]
fn xor_bytes(buf: &mut [u8], key: [u8; 4]) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte ^= key[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc_example() {
        // RFC 6455 5.7: "Hello" masked with 37 fa 21 3d.
        let mut buf = *b"Hello";
        apply_mask(&mut buf, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(buf, [0x7f, 0x9f, 0x4d, 0x51, 0x58]);
        apply_mask(&mut buf, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(&buf, b"Hello");
    }

    #[test]
    fn resume_mid_frame() {
        let key = [1, 2, 3, 4];
        let mut whole: Vec<u8> = (0..100u8).collect();
        let mut pieces = whole.clone();
        apply_mask(&mut whole, key, 0);
        let (a, rest) = pieces.split_at_mut(13);
        let (b, c) = rest.split_at_mut(30);
        apply_mask(a, key, 0);
        apply_mask(b, key, 13);
        apply_mask(c, key, 43);
        assert_eq!(whole, pieces);
    }

    #[test]
    fn huge_offset_does_not_overflow() {
        let mut a = [0u8; 9];
        let mut b = [0u8; 9];
        apply_mask(&mut a, [1, 2, 3, 4], usize::MAX);
        apply_mask_scalar(&mut b, [1, 2, 3, 4], usize::MAX);
        assert_eq!(a, b);
        assert_eq!(a[0], 4);
    }

    proptest! {
        #[test]
        fn fast_equals_scalar(
            data in proptest::collection::vec(any::<u8>(), 0..300),
            key in any::<[u8; 4]>(),
            offset in any::<usize>(),
            start in 0usize..16,
            trim in 0usize..16,
        ) {
            // Random sub-slice so that the fast path sees every alignment.
            let start = start.min(data.len());
            let end = data.len().saturating_sub(trim).max(start);
            let mut fast = data.clone();
            let mut slow = data.clone();
            apply_mask(&mut fast[start..end], key, offset);
            apply_mask_scalar(&mut slow[start..end], key, offset);
            prop_assert_eq!(&fast, &slow);
            // Involution.
            apply_mask(&mut fast[start..end], key, offset);
            prop_assert_eq!(&fast, &data);
        }
    }
}
