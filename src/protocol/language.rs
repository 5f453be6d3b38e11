//! The two languages, by the names clients send and the files they run.

use std::fmt;
use std::path::Path;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python3,
    Nodejs,
}

impl Language {
    pub const ALL: [Language; 2] = [Language::Python3, Language::Nodejs];

    /// Processes and threads the interpreter needs before it runs a line: Node starts its
    /// main thread and V8's four workers at once, and a limit below that leaves its start
    /// hanging (measured: 7; libuv's four threads start with the first asynchronous file
    /// call, which then meets the limit as a snippet's own threads would).
    pub fn min_tasks(self) -> u64 {
        match self {
            Self::Python3 => 1,
            Self::Nodejs => 7,
        }
    }

    /// The names Dify sends (`python3`, `nodejs`) plus the obvious aliases for the CLI.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "python3" | "python" | "py" => Some(Self::Python3),
            "nodejs" | "node" | "javascript" | "js" => Some(Self::Nodejs),
            _ => None,
        }
    }

    pub fn from_extension(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()? {
            "py" => Some(Self::Python3),
            "js" | "mjs" | "cjs" => Some(Self::Nodejs),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Python3 => "python3",
            Self::Nodejs => "nodejs",
        }
    }

    /// Whether the end of a run's stderr is this runtime saying it ran out of memory
    /// (what names the limit when no cgroup counts OOM kills).
    pub fn reports_out_of_memory(self, stderr_tail: &str) -> bool {
        match self {
            Self::Python3 => stderr_tail.contains("MemoryError"),
            Self::Nodejs => {
                stderr_tail.contains("heap out of memory")
                    || stderr_tail.contains("Reached heap limit")
            }
        }
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
