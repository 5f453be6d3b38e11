//! Finding a Docker engine the way a developer's machine is usually set up.
//!
//! The Docker CLI only looks at `DOCKER_HOST` and the current context. On a Mac
//! the engine can also come from colima, OrbStack or Rancher Desktop, whose
//! sockets live in the user's home, so we try those as well and, when nothing
//! answers, explain every attempt instead of a bare "connection refused".

mod discovery;
mod probe;

pub use discovery::{Candidate, Discovery};
pub use probe::{Attempt, Connected, NoEngine};

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
