//! A job's files on the host, shared by `sandbox run` (local) and the server's job
//! endpoint: `stage` copies the script and inputs into a run's /job and brings /tmp/out
//! back, `beneath` opens paths without leaving a directory (openat2), `interrupt` finds
//! a job's init to pass SIGINT on.

pub mod beneath;
pub mod interrupt;
pub mod stage;
