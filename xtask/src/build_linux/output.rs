//! Reading cargo's output as the container streams it, and the final
//! summary of what was built.

use std::path::{Path, PathBuf};

use super::Artifact;
use crate::progress::Phase;

/// Cargo's two streams as they arrive: JSON messages on stdout, the
/// human-readable diagnostics on stderr.
pub(super) struct CargoOutput<'a> {
    phase: &'a Phase,
    out: LineBuffer,
    err: LineBuffer,
    /// Paths of the built executables inside the container.
    pub executables: Vec<String>,
    /// Crates compiled by this build.
    pub compiled: usize,
    /// Crates found up to date.
    pub fresh: usize,
}

impl<'a> CargoOutput<'a> {
    pub fn new(phase: &'a Phase) -> Self {
        CargoOutput {
            phase,
            out: LineBuffer::default(),
            err: LineBuffer::default(),
            executables: Vec::new(),
            compiled: 0,
            fresh: 0,
        }
    }

    pub fn stdout(&mut self, bytes: &[u8]) {
        for line in self.out.push(bytes) {
            self.stdout_line(&line);
        }
    }

    pub fn stderr(&mut self, bytes: &[u8]) {
        for line in self.err.push(bytes) {
            self.stderr_line(&line);
        }
    }

    /// Handles what is left after the streams end without a final newline.
    pub fn finish(&mut self) {
        if let Some(line) = self.out.finish() {
            self.stdout_line(&line);
        }
        if let Some(line) = self.err.finish() {
            self.stderr_line(&line);
        }
    }

    fn stdout_line(&mut self, line: &str) {
        match parse_message(line) {
            Some(Message::Artifact { executable, fresh }) => {
                if fresh {
                    self.fresh += 1;
                } else {
                    self.compiled += 1;
                }
                self.executables.extend(executable);
            }
            Some(Message::Other) => {}
            // Build scripts may print to stdout; keep it visible.
            None => self.phase.println(line),
        }
    }

    fn stderr_line(&self, line: &str) {
        let plain = strip_ansi(line);
        let trimmed = plain.trim_start();
        if trimmed.starts_with("Compiling ") {
            self.phase.set_message(trimmed.to_string());
        }
        self.phase.println(line);
    }
}

enum Message {
    /// A `compiler-artifact`; `executable` is set for binaries.
    Artifact {
        executable: Option<String>,
        fresh: bool,
    },
    /// Any other cargo JSON message.
    Other,
}

/// Reads one line of cargo's JSON output; `None` if it is not JSON.
fn parse_message(line: &str) -> Option<Message> {
    if !line.starts_with('{') {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v.get("reason").and_then(|r| r.as_str()) != Some("compiler-artifact") {
        return Some(Message::Other);
    }
    let is_bin = v
        .pointer("/target/kind")
        .and_then(|k| k.as_array())
        .is_some_and(|kinds| kinds.iter().any(|k| k.as_str() == Some("bin")));
    let executable = v
        .get("executable")
        .and_then(|e| e.as_str())
        .filter(|_| is_bin)
        .map(str::to_string);
    let fresh = v.get("fresh").and_then(|f| f.as_bool()).unwrap_or(false);
    Some(Message::Artifact { executable, fresh })
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI sequences end with a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Splits a byte stream into lines; frames from the engine may cut lines.
#[derive(Default)]
struct LineBuffer(Vec<u8>);

impl LineBuffer {
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.0.extend_from_slice(bytes);
        let mut lines = Vec::new();
        while let Some(pos) = self.0.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.0.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line);
            lines.push(text.trim_end_matches(['\n', '\r']).to_string());
        }
        lines
    }

    fn finish(&mut self) -> Option<String> {
        if self.0.is_empty() {
            return None;
        }
        let text = String::from_utf8_lossy(&self.0).into_owned();
        self.0.clear();
        Some(text)
    }
}

/// Prints where each artifact went, its size and sha256.
pub fn print_summary(artifacts: &[Artifact]) {
    println!("Artifacts:");
    for a in artifacts {
        println!(
            "  {:<24} {}  {:>10}  sha256 {}",
            a.target.to_string(),
            display_path(&a.file.path).display(),
            crate::progress::human_size(a.file.size),
            a.file.sha256
        );
    }
}

/// Relative to the current directory when that is shorter to read.
fn display_path(p: &Path) -> PathBuf {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| p.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executable_from_cargo_json() {
        let exe = |line: &str| match parse_message(line) {
            Some(Message::Artifact { executable, .. }) => executable,
            _ => None,
        };
        let bin = r#"{"reason":"compiler-artifact","package_id":"path+file:///src#sandbox@0.1.0","target":{"kind":["bin"],"name":"sandbox"},"executable":"/cache/target/debug/sandbox","fresh":false}"#;
        assert_eq!(exe(bin).as_deref(), Some("/cache/target/debug/sandbox"));
        let lib = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"x"},"executable":null,"fresh":true}"#;
        assert_eq!(exe(lib), None);
        assert!(matches!(
            parse_message(lib),
            Some(Message::Artifact { fresh: true, .. })
        ));
        assert!(matches!(
            parse_message(r#"{"reason":"build-finished","success":true}"#),
            Some(Message::Other)
        ));
        assert!(parse_message("   Compiling x").is_none());
    }

    #[test]
    fn lines_split_across_frames() {
        let mut b = LineBuffer::default();
        assert!(b.push(b"Compil").is_empty());
        assert_eq!(
            b.push(b"ing a\nCompiling b\r\nFin"),
            ["Compiling a", "Compiling b"]
        );
        assert_eq!(b.finish().as_deref(), Some("Fin"));
        assert_eq!(b.finish(), None);
    }

    #[test]
    fn ansi_is_stripped_for_the_spinner() {
        assert_eq!(
            strip_ansi("\u{1b}[1m\u{1b}[32m   Compiling\u{1b}[0m foo"),
            "   Compiling foo"
        );
    }
}
