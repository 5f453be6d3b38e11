//! What a client and the server share: the API's types, the limits' sentences, the
//! names of a run's places. Portable (no Linux in it), so `sandbox run --server` and the
//! container-backed CLI build wherever Rust does.
// Both halves of the wire stay here, together; off Linux only the client's half is used.
#![cfg_attr(not(target_os = "linux"), allow(dead_code))]

pub mod envelope;
mod invocation;
pub mod job;
mod language;
mod limit;

use std::io::{Read, Write};

pub use invocation::{BadVariable, Invocation, check_variable};
pub use language::Language;
pub use limit::{EPERM_NOTE, LimitHit};

/// The largest request body accepted (the same limit `sandbox run` applies locally):
/// Dify's snippets are small, but `sandbox run --server` sends files.
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// Where a run finds the files it was given (`--file`, `--dir`, its script), read-only.
pub const JOB_MOUNT: &str = "/job";
/// Where a run leaves files for `--out` (its `$SANDBOX_OUT`).
pub const OUT_MOUNT: &str = "/tmp/out";

/// Copy `source` into `sink` until it ends, `limit` bytes have passed, or `sink` refuses
/// more (a run that exited: a broken pipe). Returns the bytes passed and whether the
/// source had more than `limit`.
pub fn copy_bounded(mut source: impl Read, sink: &mut impl Write, limit: u64) -> (u64, bool) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut passed = 0u64;
    loop {
        let room = usize::try_from(limit - passed).unwrap_or(usize::MAX);
        // At the limit, one byte more tells whether anything was cut.
        let want = room.clamp(1, buf.len());
        let n = match source.read(&mut buf[..want]) {
            Ok(0) => return (passed, false),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return (passed, false),
        };
        if room == 0 {
            return (passed, true);
        }
        if sink.write_all(&buf[..n]).is_err() {
            return (passed, false);
        }
        passed += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_passes_whole_under_the_limit_and_is_cut_past_it() {
        let data = vec![7u8; 200_000];
        let mut sink = Vec::new();
        assert_eq!(
            copy_bounded(&data[..], &mut sink, 1 << 20),
            (200_000, false)
        );
        assert_eq!(sink, data);
        let mut sink = Vec::new();
        assert_eq!(copy_bounded(&data[..], &mut sink, 70_000), (70_000, true));
        assert_eq!(sink.len(), 70_000);
        // Exactly the limit is not a cut.
        let mut sink = Vec::new();
        assert_eq!(
            copy_bounded(&data[..], &mut sink, 200_000),
            (200_000, false)
        );
    }
}
