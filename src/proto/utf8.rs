//! Incremental UTF-8 validation for text messages.
//!
//! This module owns [`Utf8Validator`], which checks a text message whose bytes arrive in
//! pieces (fragments, or partial reads of one frame) and reports an error at the first byte
//! that makes the message impossible to complete as valid UTF-8, as RFC 6455 section 8.1 asks
//! ("fail fast", Autobahn cases 6.4.*). Between feeds it only remembers the up to 3 bytes of an
//! incomplete trailing code point, so memory use is constant.
//!
//! Validation uses `simdutf8::compat`, whose errors carry the same information as std's
//! `Utf8Error`: `error_len() == None` means "valid so far, but the input ends inside a code
//! point", anything else means the input can never become valid.

use simdutf8::compat::from_utf8;

/// Error of [`Utf8Validator`]: the text is not (and can never become) valid UTF-8.
/// The connection closes with 1007 for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidUtf8;

impl std::fmt::Display for InvalidUtf8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("invalid UTF-8")
    }
}

impl std::error::Error for InvalidUtf8 {}

/// Incremental UTF-8 validator for text messages split over fragments.
///
/// Fails on the first byte that can no longer start/continue a valid sequence (Autobahn 6.4.*
/// "fail fast"), keeps at most 3 bytes of an incomplete trailing sequence between feeds.
#[derive(Clone, Debug, Default)]
pub struct Utf8Validator {
    /// Bytes of an incomplete code point carried over from the previous feed.
    partial: [u8; 4],
    /// How many bytes of `partial` are in use (0..=3).
    partial_len: u8,
}

impl Utf8Validator {
    /// A validator at the start of a message.
    pub fn new() -> Self {
        Self::default()
    }

    /// Validate the next piece of the message.
    ///
    /// # Errors
    /// [`InvalidUtf8`] as soon as `bytes` contains a byte that makes the message invalid,
    /// whatever follows. The validator is reset after an error.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), InvalidUtf8> {
        let mut input = bytes;
        if self.partial_len > 0 {
            // Complete the carried-over code point with as few bytes as it still needs.
            let have = usize::from(self.partial_len);
            let need = sequence_len(self.partial[0]) - have;
            let take = need.min(input.len());
            self.partial[have..have + take].copy_from_slice(&input[..take]);
            input = &input[take..];
            let len = have + take;
            match from_utf8(&self.partial[..len]) {
                Ok(_) => self.partial_len = 0,
                Err(e) if e.error_len().is_none() => {
                    // Still a valid prefix: `take < need`, so `input` is now empty.
                    self.partial_len = len as u8;
                    return Ok(());
                }
                Err(_) => return self.fail(),
            }
        }
        match from_utf8(input) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                // A truncated but so-far-valid code point: at most 3 bytes, keep them.
                let tail = &input[e.valid_up_to()..];
                self.partial[..tail.len()].copy_from_slice(tail);
                self.partial_len = tail.len() as u8;
                Ok(())
            }
            Err(_) => self.fail(),
        }
    }

    /// The message is complete: it must not end inside a code point. Resets the validator.
    ///
    /// # Errors
    /// [`InvalidUtf8`] if an incomplete code point is pending.
    pub fn finish(&mut self) -> Result<(), InvalidUtf8> {
        let dangling = self.partial_len > 0;
        self.reset();
        if dangling { Err(InvalidUtf8) } else { Ok(()) }
    }

    /// Forget any pending state (start of a new message).
    pub fn reset(&mut self) {
        self.partial_len = 0;
    }

    /// Is an incomplete code point pending?
    pub fn is_partial(&self) -> bool {
        self.partial_len > 0
    }

    fn fail(&mut self) -> Result<(), InvalidUtf8> {
        self.reset();
        Err(InvalidUtf8)
    }
}

/// Length of the sequence started by a lead byte that the validator accepted as a valid
/// prefix (so only 0xC2..=0xF4 can reach here).
fn sequence_len(lead: u8) -> usize {
    match lead {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feed `parts` one by one; return the index of the feed that failed (parts.len() means
    /// `finish` failed), or None if the whole thing is valid.
    fn run(parts: &[&[u8]]) -> Option<usize> {
        let mut v = Utf8Validator::new();
        for (i, p) in parts.iter().enumerate() {
            if v.feed(p).is_err() {
                return Some(i);
            }
        }
        v.finish().err().map(|_| parts.len())
    }

    /// Index of the first byte at which `all` can no longer be the prefix of valid UTF-8,
    /// or `all.len()` if the only problem is a truncated sequence at the end.
    fn offending_index(all: &[u8]) -> Option<usize> {
        match std::str::from_utf8(all) {
            Ok(_) => None,
            Err(e) => match e.error_len() {
                None => Some(all.len()),
                Some(len) => {
                    let v = e.valid_up_to();
                    // An invalid lead byte is itself the offender; otherwise the byte right
                    // after the maximal valid prefix of a sequence is.
                    if matches!(all[v], 0x80..=0xC1 | 0xF5..=0xFF) {
                        Some(v)
                    } else {
                        Some(v + len)
                    }
                }
            },
        }
    }

    #[test]
    fn multi_byte_split_one_byte_per_feed() {
        let s = "κόσμε 😀 €".as_bytes();
        let parts: Vec<&[u8]> = s.chunks(1).collect();
        assert_eq!(run(&parts), None);
    }

    #[test]
    fn fail_fast_examples() {
        // Autobahn 6.4.1-like: valid prefix, then a fragment that breaks it.
        assert_eq!(
            run(&[b"\xce\xba\xe1\xbd\xb9", b"\xf4\x90\x80\x80", b"edited"]),
            Some(1)
        );
        // A split code point completed with an invalid continuation.
        assert_eq!(run(&[b"\xf0", b"\x90", b"\x80", b"A"]), Some(3));
        assert_eq!(run(&[b"\xe0", b"\x80"]), Some(1));
        // Truncated at the end: only `finish` can tell.
        assert_eq!(run(&[b"abc\xe2\x82"]), Some(1));
        assert_eq!(run(&[b"\xff"]), Some(0));
        assert_eq!(run(&[b"", b"a", b""]), None);
    }

    #[test]
    fn reset_after_error() {
        let mut v = Utf8Validator::new();
        assert!(v.feed(b"\xe2\x82").is_ok());
        assert!(v.is_partial());
        assert!(v.feed(b"A").is_err());
        assert!(!v.is_partial());
        assert!(v.feed(b"ok").is_ok());
        assert!(v.finish().is_ok());
    }

    /// Split `data` at the given (unsorted, possibly out of range) points.
    fn split<'a>(data: &'a [u8], points: &[usize]) -> Vec<&'a [u8]> {
        let mut cuts: Vec<usize> = points.iter().map(|p| p % (data.len() + 1)).collect();
        cuts.sort_unstable();
        let mut parts = Vec::new();
        let mut prev = 0;
        for c in cuts {
            parts.push(&data[prev..c]);
            prev = c;
        }
        parts.push(&data[prev..]);
        parts
    }

    /// Which part contains byte `idx` (empty parts never contain anything).
    fn part_of(parts: &[&[u8]], idx: usize) -> usize {
        let mut start = 0;
        for (i, p) in parts.iter().enumerate() {
            if idx < start + p.len() {
                return i;
            }
            start += p.len();
        }
        parts.len()
    }

    proptest! {
        #[test]
        fn valid_strings_split_anywhere(s in "\\PC*", points in proptest::collection::vec(any::<usize>(), 0..8)) {
            let parts = split(s.as_bytes(), &points);
            prop_assert_eq!(run(&parts), None);
        }

        #[test]
        fn arbitrary_bytes_match_std(
            data in proptest::collection::vec(prop_oneof![any::<u8>(), 0x80u8..0xC0, 0xE0u8..0xF5], 0..40),
            points in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let parts = split(&data, &points);
            let got = run(&parts);
            prop_assert_eq!(got.is_none(), std::str::from_utf8(&data).is_ok());
            if let Some(idx) = offending_index(&data) {
                prop_assert_eq!(got, Some(part_of(&parts, idx)));
            }
        }

        #[test]
        fn valid_prefix_then_garbage(s in "\\PC{0,20}", bad in 0x80u8..=0xFF, points in proptest::collection::vec(any::<usize>(), 0..4)) {
            let mut data = s.into_bytes();
            data.push(bad);
            data.extend_from_slice(b"\x80\x80\x80");
            let parts = split(&data, &points);
            if let Some(idx) = offending_index(&data) {
                prop_assert_eq!(run(&parts), Some(part_of(&parts, idx)));
            }
        }
    }
}
