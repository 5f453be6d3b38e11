//! The `__zygote` launcher: prepares the fork server's world and becomes it. A private
//! mount namespace with the language's read-only root (built by the same steps as a
//! run's, with the cgroup directories bound writable at their own paths, so each run can
//! join its own cgroup, and an empty directory at the runs' mount point, where each run
//! builds its own root as a helper's run does), then the interpreter itself with the
//! fork server's code, the server's control socket on fd 3. It stays root: it jails its
//! runs, never itself runs a snippet.

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, unshare};
use nix::sys::prctl;
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use super::jail::{Descriptors, RealSys, execute};
use super::rootfs::{self, Extras, RootSteps};
use super::spec::RootPlan;
use super::step::{Step, StepError, step};
use super::{channel, sys};

/// The descriptor the fork server reads requests on.
const CONTROL_FD: i32 = 3;
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
    pub program: PathBuf,
    pub argv: Vec<String>,
    pub env: Vec<String>,
}

/// Entry point of `sandbox __zygote`. Returns only on failure, with an exit code.
pub fn main() -> i32 {
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
    // The server's death ends it (it would have nobody to serve).
    prctl::set_pdeathsig(Signal::SIGKILL)
        .map_err(step(Step::Descriptors, Path::new("pdeathsig")))?;
    // Its root and its runs' are built for other uids, whatever the server's umask.
    nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
    unshare(CloneFlags::CLONE_NEWNS)
        .map_err(|e| StepError::new(Step::Unshare, "CLONE_NEWNS", e.desc()))?;
    let writable: Vec<(PathBuf, PathBuf)> = spec
        .cgroup_dirs
        .iter()
        .map(|d| (d.clone(), d.clone()))
        .collect();
    let steps = rootfs::private_root(&RootSteps {
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
    });
    execute(&steps, &mut RealSys, &mut Descriptors::default())?;
    let argv = cstrings(&spec.argv)?;
    let env = cstrings(&spec.env)?;
    let program = CString::new(spec.program.as_os_str().as_encoded_bytes())
        .map_err(|e| StepError::new(Step::Exec, spec.program.display(), e))?;

    // fd 3: the control socket; 0: /dev/null; 1, 2: the server's; nothing else.
    let fd_step = |what: &'static str| {
        move |(_, e): (OwnedFd, nix::errno::Errno)| {
            StepError::new(Step::Descriptors, what, e.desc())
        }
    };
    let parked = sys::move_fd(OwnedFd::from(socket), 1021, false).map_err(fd_step("control"))?;
    // SAFETY: what this process keeps lives at 1021 (the control socket) and 0 to 2,
    // outside the range closed; it execs right after, so no frame that owned another
    // descriptor runs again.
    #[allow(unsafe_code)]
    let closed = unsafe {
        sys::close_range(CONTROL_FD as u32, 1020).and_then(|()| sys::close_range(1022, u32::MAX))
    };
    closed.map_err(step(Step::Descriptors, Path::new("close_range")))?;
    let _control = sys::move_fd(parked, CONTROL_FD, false).map_err(fd_step("fd 3"))?;
    let devnull = open(
        "/dev/null",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(step(Step::Descriptors, Path::new("/dev/null")))?;
    sys::redirect_stdin(devnull).map_err(step(Step::Descriptors, Path::new("stdin")))?;
    sys::reset_sigpipe().map_err(step(Step::Descriptors, Path::new("SIGPIPE")))?;
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

fn cstrings(items: &[String]) -> Result<Vec<CString>, StepError> {
    items
        .iter()
        .map(|s| CString::new(s.as_bytes()).map_err(|e| StepError::new(Step::Exec, "argv", e)))
        .collect()
}
