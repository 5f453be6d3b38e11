//! How a snippet travels to the interpreter: the one description of the framing that
//! the engine writes, the helper forwards and both bootstraps read.
//!
//! ```text
//! server --(worker channel)--> helper --(fd 3 of the interpreter)--> bootstrap
//!   <preload length, decimal ASCII>\n<preload bytes><code bytes>   then end of stream
//! bootstrap --(fd 3)--> helper:  one byte, ACK, once the whole frame is read
//! ```
//!
//! The bootstrap reads fd 3 to its end, writes `ACK` back, and only then compiles and
//! runs the preload (if its length is not 0) and the code. The helper therefore knows
//! for certain whether any user code ran: no ACK, no code ran, and the engine may run
//! the snippet again on a fresh worker (a warm worker killed while it waited).

/// The byte a bootstrap writes back on fd 3 after reading the whole frame.
pub const ACK: u8 = b'.';

/// The frame for `preload` then `code`.
pub fn encode(preload: &str, code: &str) -> Vec<u8> {
    let mut frame = Vec::with_capacity(preload.len() + code.len() + 24);
    frame.extend_from_slice(preload.len().to_string().as_bytes());
    frame.push(b'\n');
    frame.extend_from_slice(preload.as_bytes());
    frame.extend_from_slice(code.as_bytes());
    frame
}

/// The inverse of `encode`, as the bootstraps implement it: (preload, code).
#[cfg(test)]
pub fn decode(frame: &[u8]) -> Option<(&[u8], &[u8])> {
    let nl = frame.iter().position(|b| *b == b'\n')?;
    let n: usize = std::str::from_utf8(&frame[..nl]).ok()?.parse().ok()?;
    let rest = &frame[nl + 1..];
    (n <= rest.len()).then(|| rest.split_at(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_and_without_preload() {
        for (preload, code) in [
            ("", "print(1)"),
            ("import jinja2\n", "x = 'é\n'"),
            ("p", ""),
        ] {
            let frame = encode(preload, code);
            assert_eq!(decode(&frame), Some((preload.as_bytes(), code.as_bytes())));
        }
        assert_eq!(encode("ab", "c"), b"2\nabc");
    }

    #[test]
    fn a_code_that_starts_with_digits_and_newlines_stays_code() {
        let frame = encode("", "12\n34");
        assert_eq!(decode(&frame), Some((&b""[..], &b"12\n34"[..])));
    }
}
