//! The `__zygote` launcher: prepares the fork server's world and becomes it. A private
//! mount namespace with the language's read-only root (built by the same steps as a
//! run's, with the cgroup directories bound writable at their own paths, so each run can
//! join its own cgroup, and an empty directory at the runs' mount point, where each run
//! builds its own root as a helper's run does), then the interpreter itself with the
//! fork server's code, the server's control socket on fd 3. It stays root: it jails its
//! runs, never itself runs a snippet.

use std::ffi::CString;
use std::os::fd::{AsFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use super::jail::{Descriptors, Fd, Keep, Op, RealSys, execute};
use super::rootfs::{self, Extras, RootSteps};
use super::spec::RootPlan;
use super::step::{Step, StepError};
use super::{channel, sys};

/// The descriptor the fork server reads requests on.
const CONTROL_FD: i32 = 3;
/// Where descriptors wait while the others are closed.
const PARK_FD: i32 = 512;
/// The fork server's own /tmp: it writes nothing; its runs mount their own.
const TMP_BYTES: u64 = 1 << 20;

/// What the launcher needs, sent on its stdin like a helper's spec.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ZygoteSpec {
    /// The empty directory the root is mounted on.
    pub root_dir: PathBuf,
    pub root: RootPlan,
    /// Placeholders runs bind their own files over.
    pub root_files: Vec<(PathBuf, String)>,
    /// Host cgroup directories, bound writable at their own paths.
    pub cgroup_dirs: Vec<PathBuf>,
    /// Where each run mounts its own root (an empty directory here).
    pub run_root_dir: PathBuf,
    /// Whether the kernel can make a tree of mounts read-only (see `RootSteps`).
    pub readonly_beneath: bool,
    pub program: PathBuf,
    pub argv: Vec<String>,
    pub env: Vec<String>,
}

/// Entry point of `sandbox __zygote`. Returns only on failure, with an exit code.
pub fn main() -> i32 {
    sys::reset_signals();
    match launch() {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("sandbox fork server: {e}");
            126
        }
    }
}

enum Never {}

fn launch() -> Result<Never, StepError> {
    let control: OwnedFd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| StepError::new(Step::Descriptors, "stdin", e))?;
    let socket = UnixStream::from(control);
    let (json, _) =
        channel::recv_spec(&socket).map_err(|e| StepError::new(Step::ReadCode, "spec", e))?;
    let spec: ZygoteSpec =
        serde_json::from_slice(&json).map_err(|e| StepError::new(Step::ReadCode, "spec", e))?;
    let argv = cstrings(&spec.argv)?;
    let env = cstrings(&spec.env)?;
    let program = CString::new(spec.program.as_os_str().as_encoded_bytes())
        .map_err(|e| StepError::new(Step::Exec, spec.program.display(), e))?;
    let devnull = open(
        "/dev/null",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| StepError::new(Step::Descriptors, "/dev/null", e.desc()))?;
    let mut fds = Descriptors::default();
    fds.0.insert(Fd::Stdin, devnull.into_raw_fd());
    fds.0.insert(Fd::Stdout, 1);
    fds.0.insert(Fd::Stderr, 2);
    fds.0.insert(Fd::Code, OwnedFd::from(socket).into_raw_fd());
    execute(&steps(&spec), &mut RealSys, &mut fds)?;
    let errno = match nix::unistd::execve(&program, &argv, &env) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    Err(StepError::new(
        Step::Exec,
        spec.program.display(),
        errno.desc(),
    ))
}

/// The fork server's own setup, as jail steps: a private mount namespace and root, and
/// only its control socket (fd 3) and the standard descriptors (0 on /dev/null) kept.
/// It stays root: it jails its runs, never itself runs a snippet.
fn steps(spec: &ZygoteSpec) -> Vec<Op> {
    let writable: Vec<(PathBuf, PathBuf)> = spec
        .cgroup_dirs
        .iter()
        .map(|d| (d.clone(), d.clone()))
        .collect();
    let mut ops = vec![
        // The server's death ends it (it would have nobody to serve).
        Op::ParentDeathSignal {
            signal: libc::SIGKILL,
        },
        // Its root and its runs' are built for other uids, whatever the server's umask.
        Op::Umask { mask: 0o022 },
        Op::Unshare {
            flags: libc::CLONE_NEWNS,
        },
    ];
    ops.extend(rootfs::private_root(&RootSteps {
        root_dir: &spec.root_dir,
        plan: &spec.root,
        tmp_bytes: TMP_BYTES,
        files: &spec.root_files,
        extras: Extras {
            dirs: std::slice::from_ref(&spec.run_root_dir),
            writable: &writable,
            readonly: &[],
        },
        keep_locked: false,
        readonly_beneath: spec.readonly_beneath,
    }));
    let keep = |fd, at| Keep {
        fd,
        at,
        cloexec: false,
    };
    ops.push(Op::Descriptors {
        keep: vec![
            keep(Fd::Stdin, 0),
            keep(Fd::Stdout, 1),
            keep(Fd::Stderr, 2),
            keep(Fd::Code, CONTROL_FD),
        ],
        park: PARK_FD,
    });
    ops
}

fn cstrings(items: &[String]) -> Result<Vec<CString>, StepError> {
    items
        .iter()
        .map(|s| CString::new(s.as_bytes()).map_err(|e| StepError::new(Step::Exec, "argv", e)))
        .collect()
}
