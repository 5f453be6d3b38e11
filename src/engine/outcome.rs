//! How a run ended, in words: which limit stopped it (if any) and the `error` text Dify
//! shows. The sandbox's own notes are written and recognised here only, so a client
//! that reads them back (`sandbox run --server`) cannot drift from what the server says.

use std::time::Duration;

use crate::config::RunLimits;
use crate::protocol::{EPERM_NOTE, LimitHit};
use crate::runtime::Language;

/// SIGXFSZ: a file grew past RLIMIT_FSIZE (what Node dies of; Python ignores it and
/// gets EFBIG instead).
const SIGXFSZ: i32 = 25;
/// SIGSYS: the seccomp filter's kill action.
const SIGSYS: i32 = 31;

/// The sandbox's sentence about this limit.
pub fn note(limit: LimitHit, limits: &RunLimits) -> String {
    format!("{}: {}", limit.phrase(), detail(limit, limits))
}

fn detail(limit: LimitHit, limits: &RunLimits) -> String {
    match limit {
        LimitHit::Timeout => format!(
            "the run took longer than {}s and was killed",
            limits.timeout.as_secs_f64()
        ),
        LimitHit::Memory => format!(
            "the run used more than {} MB and was stopped",
            limits.memory_mb
        ),
        LimitHit::Output => format!(
            "a stream passed {} bytes and the run was stopped",
            limits.max_output_bytes
        ),
        LimitHit::Processes => format!(
            "at most {} processes and threads per run",
            limits.max_processes
        ),
        LimitHit::Disk => format!(
            "/tmp holds at most {} MB per run (tmp_size_mb); writing past it fails with \"No space left on device\" or \"File too large\"",
            limits.tmp_mb
        ),
    }
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
    pub error: String,
    pub limit: Option<LimitHit>,
    /// A limit the run hit and went on past (it caught the error): said by `sandbox run`,
    /// not in `error`, which Dify would take for a failure of a run that succeeded.
    pub caught: Option<String>,
    pub duration: Duration,
    pub uid: u32,
}

/// The sentence for a limit a run hit and went on past (see `RunOutcome::caught`): the
/// cgroup counted it even though the snippet caught the error it gave.
pub fn caught(
    exit_code: i32,
    limit: Option<LimitHit>,
    counters: Counters,
    limits: &RunLimits,
) -> Option<String> {
    (exit_code == 0 && limit.is_none() && counters.pids_limit_hit).then(|| {
        format!(
            "{} (the snippet went on past it)",
            note(LimitHit::Processes, limits)
        )
    })
}

/// How the interpreter ended, as far as the helper and the server saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Exited(i32),
    Signaled(i32),
    /// No report: the helper was killed (timeout, output limit) or vanished.
    Killed,
}

/// What the cgroup counted during the run (all false without a cgroup).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub oom_killed: bool,
    pub pids_limit_hit: bool,
}

/// The exit code, the limit and the `error` text of a finished run. `limit` is what the
/// server itself stopped the run for (timeout, output), if anything.
pub fn conclude(
    ending: Ending,
    stopped_for: Option<LimitHit>,
    counters: Counters,
    language: Language,
    stderr: &str,
    limits: &RunLimits,
) -> (i32, Option<LimitHit>, String) {
    let mut exit_code = match (stopped_for, ending) {
        (Some(LimitHit::Timeout), _) => -1,
        (_, Ending::Exited(code)) => code,
        (_, Ending::Signaled(signal)) => 128 + signal,
        (_, Ending::Killed) => 137,
    };
    let mut limit = stopped_for;
    if limit.is_none() && exit_code != 0 {
        limit = classify_failure(counters, language, stderr, ending);
    }
    if limit == Some(LimitHit::Output) && exit_code == 0 {
        exit_code = 137;
    }
    let mut error = describe_error(exit_code, stderr, limit, limits);
    if limit.is_none() && ending == Ending::Signaled(SIGSYS) {
        error.push('\n');
        error.push_str(SECCOMP_KILL_NOTE);
    }
    // Another limit stopped the run, but hitting pids.max on the way explains the
    // traceback the user sees ("can't start new thread"): say so too.
    if counters.pids_limit_hit && limit.is_some() && limit != Some(LimitHit::Processes) {
        let p = LimitHit::Processes;
        error.push_str(&format!("\n{} as well: {}", p.phrase(), detail(p, limits)));
    }
    (exit_code, limit, error)
}

/// Which limit explains a failed run, from the cgroup's counters or the runtime's own
/// words when no cgroup is available.
fn classify_failure(
    counters: Counters,
    language: Language,
    stderr: &str,
    ending: Ending,
) -> Option<LimitHit> {
    if counters.oom_killed {
        return Some(LimitHit::Memory);
    }
    if counters.pids_limit_hit {
        return Some(LimitHit::Processes);
    }
    let tail = tail(stderr, 4096);
    if language.reports_out_of_memory(tail) {
        return Some(LimitHit::Memory);
    }
    if tail.contains("can't start new thread") || tail.contains("Resource temporarily unavailable")
    {
        return Some(LimitHit::Processes);
    }
    if ending == Ending::Signaled(SIGXFSZ)
        || tail.contains("No space left on device")
        || tail.contains("File too large")
        || tail.contains("ENOSPC")
        || tail.contains("EFBIG")
    {
        return Some(LimitHit::Disk);
    }
    None
}

/// The last `n` bytes of `text` (or a little less, on a character boundary).
fn tail(text: &str, n: usize) -> &str {
    let mut start = text.len().saturating_sub(n);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Dify's `error`: empty on success, else what ended the run, the whole stderr, and
/// the sandbox's note.
fn describe_error(
    exit_code: i32,
    stderr: &str,
    limit: Option<LimitHit>,
    limits: &RunLimits,
) -> String {
    if exit_code == 0 && limit.is_none() {
        return String::new();
    }
    let mut msg = match limit {
        Some(LimitHit::Timeout) => note(LimitHit::Timeout, limits),
        _ => format!("process exited with code {exit_code}"),
    };
    if !stderr.is_empty() {
        msg.push('\n');
        msg.push_str(stderr);
    }
    let note = match limit {
        Some(LimitHit::Timeout) => None,
        Some(other) => Some(note(other, limits)),
        None => eperm_note(stderr),
    };
    if let Some(note) = note {
        if !msg.ends_with('\n') {
            msg.push('\n');
        }
        msg.push_str(&note);
    }
    msg
}

/// The sentence that explains a run the seccomp filter killed (exit code 159).
pub const SECCOMP_KILL_NOTE: &str = "sandbox: killed by the seccomp filter (SIGSYS): the snippet made a system call the sandbox refuses outright (an execveat other than the one that started its interpreter, or a call through the x32 or 32-bit int 0x80 ABI)";

fn eperm_note(stderr: &str) -> Option<String> {
    (stderr.contains("Operation not permitted") || stderr.contains("EPERM"))
        .then(|| EPERM_NOTE.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RunLimits {
        RunLimits {
            timeout: Duration::from_millis(1500),
            memory_mb: 64,
            max_processes: 8,
            max_output_bytes: 1000,
            tmp_mb: 4,
        }
    }

    fn conclude_py(
        ending: Ending,
        stopped: Option<LimitHit>,
        counters: Counters,
        stderr: &str,
    ) -> (i32, Option<LimitHit>, String) {
        conclude(
            ending,
            stopped,
            counters,
            Language::Python3,
            stderr,
            &limits(),
        )
    }

    #[test]
    fn a_clean_exit_has_no_error() {
        assert_eq!(
            conclude_py(Ending::Exited(0), None, Counters::default(), "warning\n"),
            (0, None, String::new())
        );
    }

    #[test]
    fn a_failure_carries_its_code_and_whole_stderr() {
        let (code, limit, error) = conclude_py(
            Ending::Exited(3),
            None,
            Counters::default(),
            "Traceback\nValueError\n",
        );
        assert_eq!((code, limit), (3, None));
        assert_eq!(error, "process exited with code 3\nTraceback\nValueError\n");
    }

    #[test]
    fn a_timeout_is_minus_one_and_opens_the_error() {
        let (code, limit, error) = conclude_py(
            Ending::Killed,
            Some(LimitHit::Timeout),
            Counters::default(),
            "partial\n",
        );
        assert_eq!((code, limit), (-1, Some(LimitHit::Timeout)));
        assert!(
            error.starts_with("timeout: the run took longer than 1.5s"),
            "{error}"
        );
        assert!(error.ends_with("partial\n"), "{error}");
    }

    #[test]
    fn the_cgroup_counters_name_memory_and_processes() {
        let oom = Counters {
            oom_killed: true,
            pids_limit_hit: false,
        };
        let (code, limit, error) = conclude_py(Ending::Signaled(9), None, oom, "");
        assert_eq!((code, limit), (137, Some(LimitHit::Memory)));
        assert!(
            error.ends_with("memory limit exceeded: the run used more than 64 MB and was stopped")
        );
        let pids = Counters {
            oom_killed: false,
            pids_limit_hit: true,
        };
        let (_, limit, error) = conclude_py(Ending::Exited(1), None, pids, "");
        assert_eq!(limit, Some(LimitHit::Processes));
        assert!(
            error.ends_with("at most 8 processes and threads per run"),
            "{error}"
        );
    }

    #[test]
    fn without_a_cgroup_the_runtimes_words_name_the_limit() {
        let none = Counters::default();
        let (_, limit, _) = conclude_py(Ending::Exited(1), None, none, "MemoryError\n");
        assert_eq!(limit, Some(LimitHit::Memory));
        let (_, limit, _) = conclude(
            Ending::Signaled(6),
            None,
            none,
            Language::Nodejs,
            "FATAL ERROR: Reached heap limit Allocation failed",
            &limits(),
        );
        assert_eq!(limit, Some(LimitHit::Memory));
        let (_, limit, _) = conclude_py(
            Ending::Exited(1),
            None,
            none,
            "RuntimeError: can't start new thread\n",
        );
        assert_eq!(limit, Some(LimitHit::Processes));
        // Python's MemoryError means nothing in a Node run.
        let (_, limit, _) = conclude(
            Ending::Exited(1),
            None,
            none,
            Language::Nodejs,
            "MemoryError",
            &limits(),
        );
        assert_eq!(limit, None);
    }

    #[test]
    fn output_overflow_after_a_clean_exit_still_fails() {
        let (code, limit, error) = conclude_py(
            Ending::Exited(0),
            Some(LimitHit::Output),
            Counters::default(),
            "",
        );
        assert_eq!((code, limit), (137, Some(LimitHit::Output)));
        assert!(error.ends_with("a stream passed 1000 bytes and the run was stopped"));
    }

    #[test]
    fn pids_max_on_the_way_to_another_limit_is_mentioned() {
        let both = Counters {
            oom_killed: true,
            pids_limit_hit: true,
        };
        let (_, limit, error) = conclude_py(Ending::Signaled(9), None, both, "");
        assert_eq!(limit, Some(LimitHit::Memory));
        assert!(
            error.ends_with(
                "\nprocess limit reached as well: at most 8 processes and threads per run"
            ),
            "{error}"
        );
    }

    #[test]
    fn a_full_tmp_names_tmp_size_mb() {
        for (ending, stderr) in [
            (
                Ending::Exited(1),
                "OSError: [Errno 28] No space left on device",
            ),
            (Ending::Exited(1), "OSError: [Errno 27] File too large"),
            (Ending::Signaled(25), ""),
        ] {
            let (_, limit, error) = conclude_py(ending, None, Counters::default(), stderr);
            assert_eq!(limit, Some(LimitHit::Disk), "{stderr}");
            assert!(
                error.ends_with("disk limit reached: /tmp holds at most 4 MB per run (tmp_size_mb); writing past it fails with \"No space left on device\" or \"File too large\""),
                "{error}"
            );
        }
    }

    #[test]
    fn a_seccomp_kill_is_named() {
        let (code, limit, error) = conclude_py(Ending::Signaled(31), None, Counters::default(), "");
        assert_eq!((code, limit), (159, None));
        assert!(error.starts_with("process exited with code 159"), "{error}");
        assert!(error.ends_with(SECCOMP_KILL_NOTE), "{error}");
    }

    #[test]
    fn eperm_gets_the_sandboxs_explanation() {
        let (_, limit, error) = conclude_py(
            Ending::Exited(1),
            None,
            Counters::default(),
            "PermissionError: [Errno 1] Operation not permitted",
        );
        assert_eq!(limit, None);
        assert!(error.ends_with(EPERM_NOTE), "{error}");
    }

    #[test]
    fn every_limit_is_recognised_from_what_it_renders() {
        let l = limits();
        for limit in LimitHit::ALL {
            let (code, stopped) = match limit {
                LimitHit::Timeout => (Ending::Killed, Some(limit)),
                LimitHit::Output => (Ending::Exited(0), Some(limit)),
                LimitHit::Disk => (Ending::Signaled(25), None),
                _ => (Ending::Signaled(9), None),
            };
            let counters = Counters {
                oom_killed: limit == LimitHit::Memory,
                pids_limit_hit: limit == LimitHit::Processes,
            };
            let (exit_code, got, error) =
                conclude(code, stopped, counters, Language::Python3, "err\n", &l);
            assert_eq!(got, Some(limit));
            assert_eq!(
                LimitHit::recognise(exit_code, &error),
                Some(limit),
                "{error}"
            );
        }
        assert_eq!(LimitHit::recognise(3, "process exited with code 3\n"), None);
        assert_eq!(LimitHit::recognise(0, ""), None);
    }
}
