//! The jail a plan's decisions make: its ordered steps, for a helper's run (which ends
//! in an exec) or a fork server's (which ends in the snippet).

use std::path::PathBuf;

use crate::isolation::jail::{Fd, Jail, Keep, Op};
use crate::isolation::rootfs::{self, Extras, RootSteps};
use crate::isolation::seccomp::{Programs, Start};
use crate::isolation::spec::{IsolationLevel, JOB_MOUNT, NetworkSetup, OUT_MOUNT, SandboxSpec};

/// The descriptor the interpreter is opened on, the only one `execveat` accepts; above
/// RLIMIT_NOFILE, so the snippet can never recreate it.
pub const EXEC_FD: i32 = crate::isolation::sys::EXEC_FD;
/// Where a failed step is written until the run starts: above everything a run keeps.
pub const ERROR_FD: i32 = 1022;
/// Where descriptors wait while the others are closed: between the two.
const PARK_FD: i32 = 512;
/// The snippet's socket in the run.
const CODE_FD: i32 = 3;

/// The steps of `spec`'s jail, in the order they must happen.
pub fn jail(spec: &SandboxSpec, seccomp: &Programs, start: Start, readonly_beneath: bool) -> Jail {
    let mut owner: Vec<Op> = (spec.cgroup_procs.iter())
        .map(|procs| Op::JoinCgroup {
            procs: procs.clone(),
        })
        .collect();
    if spec.level == IsolationLevel::Rootless {
        owner.push(Op::EnterUserNamespace {
            uid: spec.uid,
            gid: spec.gid,
        });
    }
    if spec.level.private_root() {
        // A new pid namespace applies to children only: the forked run is its pid 1, and
        // when it exits the kernel kills everything left in the namespace.
        owner.push(Op::Unshare {
            flags: libc::CLONE_NEWPID,
        });
    }

    let sigkill = libc::SIGKILL;
    let mut run = vec![
        Op::ParentDeathSignal { signal: sigkill },
        // The root is built for another uid: its directories and files must not inherit
        // a caller's restrictive umask (077 would lock the run out of its interpreter).
        Op::Umask { mask: 0o022 },
        // No controlling terminal, no process group shared with the server: group-wide
        // signals and terminal tricks reach nobody else.
        Op::NewSession,
    ];
    match spec.level {
        IsolationLevel::Namespaces | IsolationLevel::Rootless => {
            let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
            if spec.network == NetworkSetup::Offline {
                flags |= libc::CLONE_NEWNET;
            }
            run.push(Op::Unshare { flags });
            if spec.network == NetworkSetup::Own {
                run.push(Op::JoinNetwork {
                    nstype: libc::CLONE_NEWNET,
                });
            }
            run.push(Op::Hostname {
                name: "sandbox".into(),
            });
            // The init forks off early, while the process is small (a fork server's
            // run has touched few pages of its own yet), and stays behind as pid 1, in
            // the run's namespaces (pivot_root takes it into the run's root too): root,
            // but holding nothing of the run's (only its status pipe) and out of its reach
            // (another uid, and the run's filter refuses ptrace). The run's process goes on.
            run.push(Op::Init);
            let job: Vec<_> = (spec.job_dir.iter())
                .map(|d| (d.clone(), PathBuf::from(JOB_MOUNT)))
                .chain((spec.packages.iter()).cloned())
                .collect();
            let out: Vec<_> = (spec.out_dir.iter())
                .map(|d| (d.clone(), PathBuf::from(OUT_MOUNT)))
                .collect();
            run.extend(rootfs::private_root(&RootSteps {
                root_dir: &spec.root_dir,
                plan: &spec.root,
                tmp_bytes: spec.limits.tmp_bytes,
                files: &spec.root_files,
                extras: Extras {
                    dirs: &[],
                    writable: &out,
                    readonly: &job,
                },
                keep_locked: spec.level == IsolationLevel::Rootless,
                readonly_beneath,
            }));
        }
        IsolationLevel::Chroot => {
            run.push(Op::Chroot {
                dir: spec.root_dir.clone(),
            });
            run.push(Op::Init);
            // No private tmpfs without mounts: a directory only this run's uid can enter.
            run.push(Op::FreshDir {
                path: spec.workdir.clone(),
                uid: spec.uid,
                gid: spec.gid,
                mode: 0o700,
            });
            // What the run creates is its own alone, even if a path leaked out.
            run.push(Op::Umask { mask: 0o077 });
        }
    }

    // fd 0: the run's stdin, 1 and 2: its output, 3: the snippet, the error pipe and the
    // interpreter (a helper's run) high above; nothing else survives.
    let mut keep = vec![
        Keep {
            fd: Fd::Stdin,
            at: 0,
            cloexec: false,
        },
        Keep {
            fd: Fd::Stdout,
            at: 1,
            cloexec: false,
        },
        Keep {
            fd: Fd::Stderr,
            at: 2,
            cloexec: false,
        },
        Keep {
            fd: Fd::Code,
            at: CODE_FD,
            cloexec: false,
        },
        Keep {
            fd: Fd::Error,
            at: ERROR_FD,
            cloexec: true,
        },
    ];
    if start == Start::Exec {
        run.push(Op::OpenProgram {
            path: spec.program.clone(),
        });
        keep.push(Keep {
            fd: Fd::Program,
            at: EXEC_FD,
            cloexec: true,
        });
    }
    run.push(Op::Descriptors {
        keep,
        park: PARK_FD,
    });

    let l = &spec.limits;
    let mut limits = vec![
        (
            libc::RLIMIT_NOFILE,
            "RLIMIT_NOFILE",
            l.open_files.min(ERROR_FD as u64 - 1),
        ),
        (libc::RLIMIT_NPROC, "RLIMIT_NPROC", l.max_processes),
        (libc::RLIMIT_FSIZE, "RLIMIT_FSIZE", l.tmp_bytes),
        (libc::RLIMIT_CORE, "RLIMIT_CORE", 0),
        (libc::RLIMIT_CPU, "RLIMIT_CPU", l.cpu_seconds),
    ];
    if let Some(bytes) = l.address_space_bytes {
        limits.push((libc::RLIMIT_AS, "RLIMIT_AS", bytes));
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "the resource is a u32 in glibc's libc and already an i32 in musl's"
    )]
    run.extend(
        limits
            .into_iter()
            .map(|(resource, name, value)| Op::Rlimit {
                resource: resource as i32,
                name: name.into(),
                value,
            }),
    );

    if start == Start::Exec {
        // Mapped while still root: the preferred page needs CAP_SYS_RAWIO.
        run.push(Op::MapExecPage {
            address: seccomp.exec_page(),
        });
    }
    // Rootless: the user namespace has setgroups disabled and no supplementary group
    // mapped, so there is nothing to drop.
    if spec.level != IsolationLevel::Rootless {
        run.push(Op::ClearGroups);
    }
    run.push(Op::SetGid { gid: spec.gid });
    run.push(Op::SetUid { uid: spec.uid });
    run.push(Op::Dumpable);
    // Changing credentials clears the parent-death signal: set it again.
    run.push(Op::ParentDeathSignal { signal: sigkill });
    run.push(Op::Chdir {
        path: spec.cwd().to_path_buf(),
    });
    run.push(Op::NoNewPrivs);
    run.push(Op::Seccomp {
        program: seccomp.get(spec.profile, spec.network, start).to_vec(),
    });
    run.push(match start {
        Start::Exec => Op::Exec {
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            path_address: seccomp.exec_page(),
        },
        Start::Fork => Op::Start {
            env: spec.env.clone(),
        },
    });
    Jail { owner, run }
}
