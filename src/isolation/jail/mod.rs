//! A run's jail as data: the ordered steps that turn a freshly forked root process into a
//! jailed run. `engine::plan` writes them; the `__exec` helper (`execute` with the real
//! system calls) and the Python fork server (`runtime/jail.py`, the same steps through
//! ctypes) carry them out. Neither executor decides anything: every path, flag, limit and
//! id is in the steps, so the two paths build the same jail, and a test replays one list
//! through both executors' recording doubles and compares what each would have called.
//!
//! A jail has two phases. `owner` runs in the process that will wait for the run (the
//! helper, or a fork server's keeper): it joins the cgroup and makes the pid namespace,
//! which applies to its children only. Then it forks, and the child carries out `run`.

mod exec;
mod real;
#[cfg(test)]
pub mod record;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use exec::{Descriptors, execute};
pub use real::RealSys;

/// The steps of one jail, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jail {
    /// Carried out by the run's owner before it forks the run.
    pub owner: Vec<Op>,
    /// Carried out by the run's own process, up to its start.
    pub run: Vec<Op>,
}

/// A descriptor a jail's steps refer to, by what it is rather than by its number (which
/// differs between the helper and the fork server).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fd {
    /// The run's stdin pipe.
    Stdin,
    /// The run's output pipes.
    Stdout,
    Stderr,
    /// The snippet's socket.
    Code,
    /// Where a failed step is written, until the run starts.
    Error,
    /// The interpreter, opened inside the root (the helper's runs only).
    Program,
    /// The run's own network namespace, when it has one.
    Netns,
    /// Where the run's init writes how the run's process ended.
    Status,
}

/// One step. Each is one system call or a fixed short sequence of them (see `execute`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Write the calling process's pid into a cgroup's `cgroup.procs`.
    JoinCgroup {
        procs: PathBuf,
    },
    /// Rootless: a user namespace in which `uid`/`gid` are the caller's own ids and no
    /// other id exists (the helper only: the fork server never runs rootless).
    EnterUserNamespace {
        uid: u32,
        gid: u32,
    },
    /// unshare(2) with these CLONE_* flags.
    Unshare {
        flags: i32,
    },
    /// setns(2) into the run's network namespace (`Fd::Netns`), then close it.
    JoinNetwork {
        nstype: i32,
    },
    /// The signal this process gets when its parent dies.
    ParentDeathSignal {
        signal: i32,
    },
    Umask {
        mask: u32,
    },
    /// setsid(2): no controlling terminal, no process group shared with the server.
    NewSession,
    Hostname {
        name: String,
    },
    /// mount(2), as given.
    Mount {
        source: Option<PathBuf>,
        target: PathBuf,
        fstype: Option<String>,
        flags: u64,
        data: Option<String>,
    },
    /// A bind mount's read-only remount that keeps the restrictions the kernel locked on
    /// `source`'s mount (inside a user namespace a remount dropping one fails).
    RemountKeepingLocked {
        source: PathBuf,
        target: PathBuf,
        flags: u64,
    },
    /// mount_setattr(2) on `target` with these `flags` (AT_RECURSIVE): `attr_set` on it and
    /// on every mount beneath it, so none beneath a read-only bind stays writable.
    ReadOnlyTree {
        target: PathBuf,
        attr_set: u64,
        flags: u32,
    },
    /// The steps in `then`, only if `path` exists (a device or a /proc file this kernel
    /// lacks is skipped).
    IfExists {
        path: PathBuf,
        then: Vec<Op>,
    },
    /// mkdir -p, mode 0755.
    MakeDir {
        path: PathBuf,
    },
    /// A place to bind `like` on: a directory if it is one, else an empty file.
    MakeMountPoint {
        like: PathBuf,
        path: PathBuf,
    },
    /// A symbolic link, its parent directories made; an existing entry is kept.
    Symlink {
        target: PathBuf,
        path: PathBuf,
    },
    /// A file with these contents, its parent directories made.
    WriteFile {
        path: PathBuf,
        contents: String,
    },
    Chmod {
        path: PathBuf,
        mode: u32,
    },
    /// chdir into `new_root`, pivot_root(".", "."), unmount the old root with `detach`
    /// (MNT_DETACH), chdir("/").
    PivotRoot {
        new_root: PathBuf,
        detach: i32,
    },
    /// chroot(2) into `dir`, then chdir("/").
    Chroot {
        dir: PathBuf,
    },
    /// A directory made afresh (what was there removed), owned by `uid`/`gid`.
    FreshDir {
        path: PathBuf,
        uid: u32,
        gid: u32,
        mode: u32,
    },
    /// Open `path` read-only, close-on-exec, as `Fd::Program`.
    OpenProgram {
        path: PathBuf,
    },
    /// Keep exactly these descriptors, each moved to its number (close-on-exec where
    /// said); every other descriptor is closed. They are first parked at `park` and up.
    Descriptors {
        keep: Vec<Keep>,
        park: i32,
    },
    /// setrlimit(2), soft and hard alike.
    Rlimit {
        resource: i32,
        name: String,
        value: u64,
    },
    /// Map one read-only, zero-filled page at `address`'s page (the empty path the
    /// seccomp filter lets `execveat` take), never over an existing mapping.
    MapExecPage {
        address: u64,
    },
    /// setgroups(0, NULL).
    ClearGroups,
    /// setresgid(2), all three alike.
    SetGid {
        gid: u32,
    },
    /// setresuid(2), all three alike.
    SetUid {
        uid: u32,
    },
    /// fork(2): the parent becomes the run's init (what tini or `docker run --init` is),
    /// the child goes on with the next step. The init keeps only `Fd::Status`; it
    /// forwards every signal it gets to the child, reaps whatever ends, and when the
    /// child ends writes how (`exited N` or `signaled N`) to `Fd::Status` and exits. So
    /// the snippet is not pid 1 of its namespace: a signal it sends itself, or abort(),
    /// ends it as on the host.
    Init,
    /// prctl(PR_SET_DUMPABLE, 1): changing credentials made the process undumpable, which
    /// leaves its /proc entries root's. An exec makes it dumpable again; a forked run
    /// that never execs would be the one run unable to read its own /proc/self.
    Dumpable,
    Chdir {
        path: PathBuf,
    },
    NoNewPrivs,
    /// Load this classic BPF program (`struct sock_filter` entries) as the seccomp filter.
    Seccomp {
        #[serde(with = "hex_bytes")]
        program: Vec<u8>,
    },
    /// The helper's last step: SIGPIPE back to its default, then execveat(2) of
    /// `Fd::Program` with the empty path at `path_address`. Returns only on failure.
    Exec {
        argv: Vec<String>,
        env: Vec<String>,
        path_address: u64,
    },
    /// The fork server's last step: the environment replaced, the error pipe closed; the
    /// snippet follows in this process.
    Start {
        env: Vec<String>,
    },
}

/// A descriptor a run keeps, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keep {
    pub fd: Fd,
    pub at: i32,
    pub cloexec: bool,
}

/// Binary data in JSON as lowercase hex: what the fork server decodes with `bytes.fromhex`.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(text).map_err(D::Error::custom)
    }
}
