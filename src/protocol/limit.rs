//! The limit that stopped a run, and the phrase that opens its note: the engine writes
//! the notes (`engine::outcome`), a client reads them back from a run's `exit_code` and
//! `error`, both from these phrases, so the two cannot drift.

use serde::Serialize;

/// The limit that stopped a run, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitHit {
    Timeout,
    Memory,
    Output,
    Processes,
    Disk,
}

impl LimitHit {
    pub const ALL: [LimitHit; 5] = [
        Self::Timeout,
        Self::Memory,
        Self::Output,
        Self::Processes,
        Self::Disk,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Memory => "memory",
            Self::Output => "output",
            Self::Processes => "processes",
            Self::Disk => "disk",
        }
    }

    /// Each limit's note starts with its own phrase; the timeout's note opens `error`
    /// instead of closing it.
    pub fn phrase(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Memory => "memory limit exceeded",
            Self::Output => "output limit exceeded",
            Self::Processes => "process limit reached",
            Self::Disk => "disk limit reached",
        }
    }

    /// The limit a run's answer names, read back from its `exit_code` and `error`
    /// (what a client of the HTTP API has).
    pub fn recognise(exit_code: i32, error: &str) -> Option<Self> {
        if exit_code == -1 || error.starts_with(Self::Timeout.phrase()) {
            return Some(Self::Timeout);
        }
        let last = error.lines().last().unwrap_or("");
        Self::ALL
            .into_iter()
            .find(|l| *l != Self::Timeout && last.starts_with(l.phrase()))
    }
}

/// The sentence that explains an EPERM in the snippet's own stderr.
pub const EPERM_NOTE: &str = "sandbox: operation not permitted: the snippet tried something the sandbox forbids \
     (running programs, creating processes, network without enable_network, or a blocked system call)";
