//! How a snippet travels to the interpreter: the one description of the framing that
//! the engine writes, the helper forwards and both bootstraps read.
//!
//! ```text
//! server --(worker channel)--> helper --(fd 3 of the interpreter)--> bootstrap
//!   <P> <A> <E>\n                decimal ASCII: preload length in bytes, argument count,
//!                                variable count
//!   <length>\n<filename>         the name the code runs under; empty: the bootstrap's own
//!   (<length>\n<argument>) x A   the snippet's argv, its script's name first; none: the
//!                                bootstrap's default ([""] for Python, Node's own)
//!   (<length>\n<NAME=value>) x E set in the snippet's environment before it runs
//!   <preload bytes: P><code bytes: to the end of the stream>
//! bootstrap --(fd 3)--> helper:  one byte, ACK, once the whole frame is read
//! bootstrap --(fd 3)--> helper    then, from Node and forked Python runs, at their end:
//!   or server                     ENDED and the exit status in decimal ASCII, once
//!                                 stdout and stderr are closed
//! ```
//!
//! Every length is decimal ASCII, in bytes. The bootstrap reads fd 3 to its end, writes
//! `ACK` back, and only then applies argv and environment and compiles and runs the
//! preload (if its length is not 0) and the code. The helper therefore knows for certain
//! whether any user code ran: no ACK, no code ran, and the engine may run the snippet
//! again on a fresh worker (a warm worker killed while it waited).
//!
//! Python's decoder is `runtime/frame.py` (shared by the bootstrap and the fork server),
//! Node's is in `runtime/nodejs.rs`; both only split bytes, so a run pays no parser.

use crate::protocol::Invocation;

/// The byte a bootstrap writes back on fd 3 after reading the whole frame.
pub const ACK: u8 = b'.';

/// The byte a Node or forked Python run writes on fd 3 before its exit status, once its
/// output is complete and closed. The server answers from it instead of waiting for the
/// process's teardown (about 2 ms for a forked interpreter, more for V8), and confirms
/// the end with the run's owner afterwards. The snippet could write it too: it can only claim an exit
/// status it could have exited with, and a run that claims and goes on is killed.
pub const ENDED: u8 = b'=';

/// `script` (a bootstrap's source) with its `__ACK__` and `__ENDED__` placeholders
/// replaced by the bytes above.
pub fn with_markers(script: &str) -> String {
    script
        .replace("__ACK__", &char::from(ACK).to_string())
        .replace("__ENDED__", &char::from(ENDED).to_string())
}

/// The most a run's fd 3 is read: the acknowledgement and an announced end.
pub const CHANNEL_CAP: u64 = 64;

/// The exit status a run announced on fd 3 (`text` is all that came back there), if the
/// text is exactly the acknowledgement and one announcement.
pub fn announced_end(text: &[u8]) -> Option<i32> {
    let rest = text.strip_prefix(&[ACK])?.strip_prefix(&[ENDED])?;
    if rest.is_empty() || rest.len() > 3 || !rest.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let code: i32 = std::str::from_utf8(rest).ok()?.parse().ok()?;
    (0..=255).contains(&code).then_some(code)
}

fn push_item(frame: &mut Vec<u8>, item: &[u8]) {
    frame.extend_from_slice(item.len().to_string().as_bytes());
    frame.push(b'\n');
    frame.extend_from_slice(item);
}

/// The frame for `preload` then `code`, invoked as `how` says.
pub fn encode(preload: &str, code: &str, how: &Invocation) -> Vec<u8> {
    let mut frame = Vec::with_capacity(preload.len() + code.len() + 64);
    let header = format!("{} {} {}\n", preload.len(), how.argv.len(), how.env.len());
    frame.extend_from_slice(header.as_bytes());
    push_item(&mut frame, how.filename.as_bytes());
    for arg in &how.argv {
        push_item(&mut frame, arg.as_bytes());
    }
    for (name, value) in &how.env {
        push_item(&mut frame, format!("{name}={value}").as_bytes());
    }
    frame.extend_from_slice(preload.as_bytes());
    frame.extend_from_slice(code.as_bytes());
    frame
}

/// A frame taken apart, as the bootstraps do it.
#[cfg(test)]
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded<'a> {
    pub preload: &'a [u8],
    pub code: &'a [u8],
    pub filename: &'a [u8],
    pub argv: Vec<&'a [u8]>,
    pub env: Vec<&'a [u8]>,
}

/// The inverse of `encode`, step by step as `runtime/frame.py` goes.
#[cfg(test)]
pub fn decode(frame: &[u8]) -> Option<Decoded<'_>> {
    fn number(bytes: &[u8]) -> Option<usize> {
        std::str::from_utf8(bytes).ok()?.parse().ok()
    }
    let nl = frame.iter().position(|b| *b == b'\n')?;
    let header: Vec<usize> = std::str::from_utf8(&frame[..nl])
        .ok()?
        .split(' ')
        .map(|n| n.parse().ok())
        .collect::<Option<_>>()?;
    let [p, a, e] = header[..] else { return None };
    let mut rest = &frame[nl + 1..];
    let mut items = Vec::new();
    for _ in 0..1 + a + e {
        let nl = rest.iter().position(|b| *b == b'\n')?;
        let n = number(&rest[..nl])?;
        let body = rest.get(nl + 1..nl + 1 + n)?;
        items.push(body);
        rest = &rest[nl + 1 + n..];
    }
    let (preload, code) = (p <= rest.len()).then(|| rest.split_at(p))?;
    Some(Decoded {
        preload,
        code,
        filename: items[0],
        argv: items[1..1 + a].to_vec(),
        env: items[1 + a..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_acknowledgement_and_one_exact_announcement_count() {
        assert_eq!(announced_end(b".=0"), Some(0));
        assert_eq!(announced_end(b".=255"), Some(255));
        for text in [
            &b"."[..],
            b"",
            b"=0",
            b".=",
            b".=256",
            b".=0=1",
            b".=-1",
            b".=0001",
            b".= 1",
            b"..=0",
        ] {
            assert_eq!(
                announced_end(text),
                None,
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn frames_round_trip_with_and_without_preload() {
        for (preload, code) in [
            ("", "print(1)"),
            ("import jinja2\n", "x = 'é\n'"),
            ("p", ""),
        ] {
            let frame = encode(preload, code, &Invocation::default());
            let d = decode(&frame).expect("decodes");
            assert_eq!((d.preload, d.code), (preload.as_bytes(), code.as_bytes()));
            assert_eq!(d.filename, b"");
            assert!(d.argv.is_empty() && d.env.is_empty());
        }
        // Dify's runs: a header and an empty filename before the code.
        assert_eq!(encode("ab", "c", &Invocation::default()), b"2 0 0\n0\nabc");
    }

    #[test]
    fn argv_and_environment_travel_with_any_bytes() {
        let how = Invocation {
            filename: "/job/job.py".into(),
            argv: vec![
                "job.py".into(),
                "a b".into(),
                "".into(),
                "x\ny".into(),
                "é漢".into(),
                "12\n34".into(),
            ],
            env: vec![
                ("MODE".into(), "ci".into()),
                ("EMPTY".into(), "".into()),
                ("EQ".into(), "a=b\n".into()),
            ],
        };
        let frame = encode("", "import sys", &how);
        let d = decode(&frame).expect("decodes");
        assert_eq!(d.filename, b"/job/job.py");
        let argv: Vec<&[u8]> = how.argv.iter().map(|a| a.as_bytes()).collect();
        assert_eq!(d.argv, argv);
        assert_eq!(d.env, vec![&b"MODE=ci"[..], b"EMPTY=", b"EQ=a=b\n"]);
        assert_eq!(d.code, b"import sys");
        assert!(frame.starts_with(b"0 6 3\n11\n/job/job.py6\njob.py3\na b0\n"));
    }

    #[test]
    fn a_code_that_starts_with_digits_and_newlines_stays_code() {
        let frame = encode("", "12\n34", &Invocation::default());
        let d = decode(&frame).expect("decodes");
        assert_eq!((d.preload, d.code), (&b""[..], &b"12\n34"[..]));
    }
}
