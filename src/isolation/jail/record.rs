//! A recording double of the system calls (as youki's `Syscall` trait has one): each call
//! is kept as a JSON array, in order, so a test can check the order of a jail's steps
//! without root, and compare the Rust executor's calls with the Python one's
//! (`runtime/jail.py` driven by the same double written in Python: `PYTHON_RECORDER`).

use std::collections::BTreeSet;
use std::os::fd::RawFd;
use std::path::Path;

use nix::errno::Errno;
use serde_json::{Value, json};

use super::exec::{Kind, Sys};
use crate::isolation::step::StepError;

/// What the recorder answers about paths: directories unless listed as files or missing.
#[derive(Debug, Default)]
pub struct Recorder {
    pub calls: Vec<Value>,
    pub files: BTreeSet<String>,
    pub missing: BTreeSet<String>,
    opened: i32,
    dups: i32,
}

fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

impl Recorder {
    fn call(&mut self, v: Value) {
        self.calls.push(v);
    }

    /// The names of the calls, in order.
    pub fn names(&self) -> Vec<String> {
        self.calls
            .iter()
            .map(|c| c[0].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

impl Sys for Recorder {
    fn join_cgroup(&mut self, procs: &Path) -> Result<(), Errno> {
        self.call(json!(["join_cgroup", p(procs)]));
        Ok(())
    }
    fn enter_user_namespace(&mut self, uid: u32, gid: u32) -> Result<(), StepError> {
        self.call(json!(["enter_user_namespace", uid, gid]));
        Ok(())
    }
    fn unshare(&mut self, flags: i32) -> Result<(), Errno> {
        self.call(json!(["unshare", flags]));
        Ok(())
    }
    fn setns(&mut self, fd: RawFd, nstype: i32) -> Result<(), Errno> {
        self.call(json!(["setns", fd, nstype]));
        Ok(())
    }
    fn set_pdeathsig(&mut self, signal: i32) -> Result<(), Errno> {
        self.call(json!(["set_pdeathsig", signal]));
        Ok(())
    }
    fn umask(&mut self, mask: u32) {
        self.call(json!(["umask", mask]));
    }
    fn setsid(&mut self) -> Result<(), Errno> {
        self.call(json!(["setsid"]));
        Ok(())
    }
    fn sethostname(&mut self, name: &str) -> Result<(), Errno> {
        self.call(json!(["sethostname", name]));
        Ok(())
    }
    fn mount(
        &mut self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: u64,
        data: Option<&str>,
    ) -> Result<(), Errno> {
        self.call(json!([
            "mount",
            source.map(p),
            p(target),
            fstype,
            flags,
            data
        ]));
        Ok(())
    }
    fn mount_setattr(&mut self, target: &Path, flags: u32, attr_set: u64) -> Result<(), Errno> {
        self.call(json!(["mount_setattr", p(target), flags, attr_set]));
        Ok(())
    }
    fn locked_flags(&mut self, path: &Path) -> u64 {
        self.call(json!(["locked_flags", p(path)]));
        0
    }
    fn umount2(&mut self, target: &Path, flags: i32) -> Result<(), Errno> {
        self.call(json!(["umount2", p(target), flags]));
        Ok(())
    }
    fn kind(&mut self, path: &Path) -> Kind {
        let path = p(path);
        if self.missing.contains(&path) {
            Kind::Missing
        } else if self.files.contains(&path) {
            Kind::Other
        } else {
            Kind::Dir
        }
    }
    fn entry_exists(&mut self, path: &Path) -> bool {
        !self.missing.contains(&p(path))
    }
    fn mkdir_all(&mut self, path: &Path) -> Result<(), Errno> {
        self.call(json!(["mkdir_all", p(path)]));
        Ok(())
    }
    fn create_file(&mut self, path: &Path) -> Result<(), Errno> {
        self.call(json!(["create_file", p(path)]));
        Ok(())
    }
    fn symlink(&mut self, target: &Path, path: &Path) -> Result<(), Errno> {
        self.call(json!(["symlink", p(target), p(path)]));
        Ok(())
    }
    fn write_file(&mut self, path: &Path, contents: &str) -> Result<(), Errno> {
        self.call(json!(["write_file", p(path), contents]));
        Ok(())
    }
    fn chmod(&mut self, path: &Path, mode: u32) -> Result<(), Errno> {
        self.call(json!(["chmod", p(path), mode]));
        Ok(())
    }
    fn chown(&mut self, path: &Path, uid: u32, gid: u32) -> Result<(), Errno> {
        self.call(json!(["chown", p(path), uid, gid]));
        Ok(())
    }
    fn remove_all(&mut self, path: &Path) {
        self.call(json!(["remove_all", p(path)]));
    }
    fn mkdir(&mut self, path: &Path) -> Result<(), Errno> {
        self.call(json!(["mkdir", p(path)]));
        Ok(())
    }
    fn chdir(&mut self, path: &Path) -> Result<(), Errno> {
        self.call(json!(["chdir", p(path)]));
        Ok(())
    }
    fn pivot_root_here(&mut self) -> Result<(), Errno> {
        self.call(json!(["pivot_root_here"]));
        Ok(())
    }
    fn chroot(&mut self, dir: &Path) -> Result<(), Errno> {
        self.call(json!(["chroot", p(dir)]));
        Ok(())
    }
    fn open_read(&mut self, path: &Path) -> Result<RawFd, Errno> {
        self.opened += 1;
        let fd = 100 + self.opened;
        self.call(json!(["open_read", p(path), fd]));
        Ok(fd)
    }
    fn dup_above(&mut self, fd: RawFd, base: RawFd) -> Result<RawFd, Errno> {
        let got = base + self.dups;
        self.dups += 1;
        self.call(json!(["dup_above", fd, base, got]));
        Ok(got)
    }
    fn dup_to(&mut self, fd: RawFd, target: RawFd, cloexec: bool) -> Result<(), Errno> {
        self.call(json!(["dup_to", fd, target, cloexec]));
        Ok(())
    }
    fn close_range(&mut self, first: RawFd, last: RawFd) -> Result<(), Errno> {
        self.call(json!(["close_range", first, last]));
        Ok(())
    }
    fn close(&mut self, fd: RawFd) {
        self.call(json!(["close", fd]));
    }
    fn setrlimit(&mut self, resource: i32, value: u64) -> Result<(), Errno> {
        self.call(json!(["setrlimit", resource, value]));
        Ok(())
    }
    fn map_page(&mut self, address: u64) -> Result<(), Errno> {
        self.call(json!(["map_page", address]));
        Ok(())
    }
    fn clear_groups(&mut self) -> Result<(), Errno> {
        self.call(json!(["clear_groups"]));
        Ok(())
    }
    fn setresgid(&mut self, gid: u32) -> Result<(), Errno> {
        self.call(json!(["setresgid", gid]));
        Ok(())
    }
    fn setresuid(&mut self, uid: u32) -> Result<(), Errno> {
        self.call(json!(["setresuid", uid]));
        Ok(())
    }
    fn no_new_privs(&mut self) -> Result<(), Errno> {
        self.call(json!(["no_new_privs"]));
        Ok(())
    }
    fn set_dumpable(&mut self) -> Result<(), Errno> {
        self.call(json!(["set_dumpable"]));
        Ok(())
    }
    fn fork_init(&mut self, status: RawFd) -> Result<(), Errno> {
        self.call(json!(["fork_init", status]));
        Ok(())
    }
    fn seccomp(&mut self, program: &[u8]) -> Result<(), Errno> {
        self.call(json!(["seccomp", hex::encode(program)]));
        Ok(())
    }
    fn reset_sigpipe(&mut self) -> Result<(), Errno> {
        self.call(json!(["reset_sigpipe"]));
        Ok(())
    }
    fn exec(&mut self, fd: RawFd, path_address: u64, argv: &[String], env: &[String]) -> Errno {
        self.call(json!(["exec", fd, path_address, argv, env]));
        Errno::ENOEXEC
    }
    fn start(&mut self, env: &[String], error: RawFd) {
        self.call(json!(["start", env, error]));
    }
}

/// The same double for `runtime/jail.py`: reads `{"ops", "fds", "files", "missing"}` as
/// JSON on stdin, runs the executor against it, prints the calls as JSON.
pub const PYTHON_RECORDER: &str = r#"
import json, sys as _sys

class Recorder:
    def __init__(self, files, missing):
        self.calls, self.files, self.missing = [], set(files), set(missing)
        self.opened, self.dups = 0, 0
    def _c(self, *a):
        self.calls.append(list(a))
    def join_cgroup(self, procs): self._c("join_cgroup", procs)
    def unshare(self, flags): self._c("unshare", flags)
    def setns(self, fd, nstype): self._c("setns", fd, nstype)
    def set_pdeathsig(self, s): self._c("set_pdeathsig", s)
    def umask(self, m): self._c("umask", m)
    def setsid(self): self._c("setsid")
    def sethostname(self, n): self._c("sethostname", n)
    def mount(self, s, t, f, fl, d): self._c("mount", s, t, f, fl, d)
    def umount2(self, t, fl): self._c("umount2", t, fl)
    def mount_setattr(self, t, fl, a): self._c("mount_setattr", t, fl, a)
    def kind(self, p):
        return "missing" if p in self.missing else ("other" if p in self.files else "dir")
    def entry_exists(self, p): return p not in self.missing
    def mkdir_all(self, p): self._c("mkdir_all", p)
    def create_file(self, p): self._c("create_file", p)
    def symlink(self, t, p): self._c("symlink", t, p)
    def write_file(self, p, c): self._c("write_file", p, c)
    def chmod(self, p, m): self._c("chmod", p, m)
    def chown(self, p, u, g): self._c("chown", p, u, g)
    def remove_all(self, p): self._c("remove_all", p)
    def mkdir(self, p): self._c("mkdir", p)
    def chdir(self, p): self._c("chdir", p)
    def pivot_root_here(self): self._c("pivot_root_here")
    def chroot(self, p): self._c("chroot", p)
    def open_read(self, p):
        self.opened += 1
        self._c("open_read", p, 100 + self.opened)
        return 100 + self.opened
    def dup_above(self, fd, base):
        got = base + self.dups
        self.dups += 1
        self._c("dup_above", fd, base, got)
        return got
    def dup_to(self, fd, t, c): self._c("dup_to", fd, t, c)
    def close_range(self, a, b): self._c("close_range", a, b)
    def close(self, fd): self._c("close", fd)
    def setrlimit(self, r, v): self._c("setrlimit", r, v)
    def clear_groups(self): self._c("clear_groups")
    def setresgid(self, g): self._c("setresgid", g)
    def setresuid(self, u): self._c("setresuid", u)
    def no_new_privs(self): self._c("no_new_privs")
    def set_dumpable(self): self._c("set_dumpable")
    def fork_init(self, status): self._c("fork_init", status)
    def seccomp(self, prog): self._c("seccomp", prog.hex())
    def start(self, env, error): self._c("start", env, error)

req = json.load(_sys.stdin)
rec = Recorder(req["files"], req["missing"])
execute(req["ops"], rec, dict(req["fds"]))
print(json.dumps(rec.calls))
"#;
