//! Host checks behind `sandbox doctor`: each says ok, warning or failed, with a one-line
//! fix for the detected distribution. Failed means `serve` cannot work as configured;
//! warning means something optional (building, the xtask, optional modules) is missing.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;
use crate::isolation::detect;
use crate::runtime::{nodejs, python};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warning,
    Failed,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    pub fix: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub distribution: String,
    pub package_manager: PackageManager,
    pub checks: Vec<Check>,
    /// The isolation `serve` would use, or `None` when it could not start.
    pub isolation: Option<String>,
    /// Why `serve` could not start, when it could not.
    pub isolation_error: Option<String>,
    /// No check failed.
    pub ok: bool,
}

/// The package manager fix hints are written for, from /etc/os-release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PackageManager {
    Apt,
    Dnf,
    Yum,
    Apk,
    Pacman,
    Unknown,
}

/// What a fix installs; each package manager names it differently.
#[derive(Debug, Clone, Copy)]
enum Need {
    Libseccomp,
    LibseccompDev,
    Gcc,
    Python,
    Node,
    Docker,
    Nftables,
}

impl PackageManager {
    /// From the text of /etc/os-release: ID first, then the families in ID_LIKE.
    pub fn from_os_release(text: &str) -> (String, Self) {
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(|v| v.trim().trim_matches('"').to_string())
                .unwrap_or_default()
        };
        let id = field("ID").to_ascii_lowercase();
        let version = field("VERSION_ID");
        let like = field("ID_LIKE").to_ascii_lowercase();
        let pretty = field("PRETTY_NAME");
        let name = if id.is_empty() {
            "unknown".to_string()
        } else {
            id.clone()
        };
        let pm = std::iter::once(id.as_str())
            .chain(like.split_whitespace())
            .find_map(|family| match family {
                "debian" | "ubuntu" => Some(Self::Apt),
                "fedora" | "rhel" | "centos" | "rocky" | "almalinux" | "amzn" => {
                    // RHEL/CentOS 7 and Amazon Linux 2 have yum only.
                    let old = version.starts_with('7') || (id == "amzn" && version == "2");
                    Some(if old { Self::Yum } else { Self::Dnf })
                }
                "alpine" => Some(Self::Apk),
                "arch" | "manjaro" | "endeavouros" => Some(Self::Pacman),
                _ => None,
            })
            .unwrap_or(Self::Unknown);
        let shown = if pretty.is_empty() { name } else { pretty };
        (shown, pm)
    }

    fn detect() -> (String, Self) {
        match std::fs::read_to_string("/etc/os-release")
            .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        {
            Ok(text) => Self::from_os_release(&text),
            Err(_) => ("unknown".into(), Self::Unknown),
        }
    }

    fn packages(self, need: Need) -> &'static str {
        use Need::*;
        use PackageManager::*;
        match (self, need) {
            (Apt, Libseccomp) => "libseccomp2",
            (Apt, LibseccompDev) => "libseccomp-dev pkg-config",
            (Apt, Gcc) => "gcc libc6-dev",
            (Apt, Python) => "python3",
            (Apt, Node) => "nodejs",
            (Apt, Docker) => "docker.io",
            (Dnf | Yum, Libseccomp) => "libseccomp",
            (Dnf | Yum, LibseccompDev) => "libseccomp-devel pkgconf-pkg-config",
            (Dnf | Yum, Gcc) => "gcc glibc-devel",
            (Dnf | Yum, Python) => "python3",
            (Dnf | Yum, Node) => "nodejs",
            (Dnf | Yum, Docker) => "moby-engine",
            (Apk, Libseccomp) => "libseccomp",
            (Apk, LibseccompDev) => "libseccomp-dev pkgconf",
            (Apk, Gcc) => "gcc musl-dev",
            (Apk, Python) => "python3",
            (Apk, Node) => "nodejs",
            (Apk, Docker) => "docker",
            (Pacman, Libseccomp | LibseccompDev) => "libseccomp pkgconf",
            (Pacman, Gcc) => "gcc",
            (Pacman, Python) => "python",
            (Pacman, Node) => "nodejs",
            (Pacman, Docker) => "docker",
            (Unknown, Libseccomp) => "libseccomp (version 2.5 or later)",
            (Unknown, LibseccompDev) => "libseccomp's development files and pkg-config",
            (Unknown, Gcc) => "gcc and the C library headers",
            (Unknown, Python) => "Python 3",
            (Unknown, Node) => "Node.js",
            (Unknown, Docker) => "Docker",
            (_, Nftables) => "nftables",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Apt => "apt",
            Self::Dnf => "dnf",
            Self::Yum => "yum",
            Self::Apk => "apk",
            Self::Pacman => "pacman",
            Self::Unknown => "unknown package manager",
        }
    }

    /// The one command that installs what is needed.
    fn install(self, need: Need) -> String {
        let pkgs = self.packages(need);
        match self {
            Self::Apt => format!("apt-get install -y {pkgs}"),
            Self::Dnf => format!("dnf install -y {pkgs}"),
            Self::Yum => format!("yum install -y {pkgs}"),
            Self::Apk => format!("apk add {pkgs}"),
            Self::Pacman => format!("pacman -S --needed {pkgs}"),
            Self::Unknown => format!("install {pkgs} with your package manager"),
        }
    }
}

fn check(name: &str, status: Status, detail: impl Into<String>, fix: Option<String>) -> Check {
    Check {
        name: name.into(),
        status,
        detail: detail.into(),
        fix,
    }
}

fn ok(name: &str, detail: impl Into<String>) -> Check {
    check(name, Status::Ok, detail, None)
}

/// Run `program args` and return its trimmed stdout when it succeeds.
fn output_of(program: &str, args: &[&str]) -> Result<String, String> {
    match Command::new(program).args(args).output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Load the configuration the way `serve` would. When it does not load, the remaining
/// checks still run, against the embedded defaults.
fn config_check(path: Option<&Path>) -> (Vec<Check>, Option<Config>) {
    let cwd = std::env::current_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|_| "?".into());
    let origin = match (path, crate::config::config_path(path)) {
        (Some(p), _) => p.display().to_string(),
        (None, Some(default)) => format!("{cwd}/{}", default.display()),
        (None, None) => format!("embedded defaults (no conf/config.yaml in {cwd})"),
    };
    match crate::config::load_config(path) {
        Ok(config) => {
            let mut checks = vec![ok("config", format!("{origin} parses"))];
            if !config.unknown_keys.is_empty() {
                checks.push(check(
                    "config keys",
                    Status::Warning,
                    format!("unknown keys ignored: {}", config.unknown_keys.join(", ")),
                    Some("check their spelling against conf/config.yaml".into()),
                ));
            }
            (checks, Some(config))
        }
        Err(e) => {
            let checks = vec![check(
                "config",
                Status::Failed,
                format!("{e:#}"),
                Some("fix the file or the environment variable named above".into()),
            )];
            // The environment may be what is broken: the embedded defaults alone always load.
            let fallback = Config::load(None, &HashMap::new()).ok();
            (checks, fallback)
        }
    }
}

/// Effective capabilities, from /proc/self/status.
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn privileges_check(root: bool, caps: u64, user_namespaces: &Result<(), String>) -> Check {
    const NEEDED: &[(u32, &str)] = &[
        (6, "CAP_SETGID"),
        (7, "CAP_SETUID"),
        (5, "CAP_KILL"),
        (18, "CAP_SYS_CHROOT"),
        (21, "CAP_SYS_ADMIN"),
    ];
    let missing: Vec<&str> = NEEDED
        .iter()
        .filter(|(bit, _)| caps & (1u64 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    if !root {
        return match user_namespaces {
            Ok(()) => check(
                "privileges",
                Status::Warning,
                format!(
                    "not root (uid {}): rootless mode in a user namespace, with rlimits instead of cgroups",
                    nix::unistd::geteuid()
                ),
                Some("run as root (sudo sandbox ...) for per-run cgroups and the exec lock".into()),
            ),
            Err(e) => check(
                "privileges",
                Status::Failed,
                format!(
                    "not root (uid {}) and no user namespace: {e}",
                    nix::unistd::geteuid()
                ),
                Some(
                    "run as root (sudo sandbox ...); `sandbox run --server URL` needs no root"
                        .into(),
                ),
            ),
        };
    }
    match missing.as_slice() {
        [] => ok(
            "privileges",
            "root with CAP_SETUID, CAP_SETGID, CAP_KILL, CAP_SYS_CHROOT, CAP_SYS_ADMIN",
        ),
        ["CAP_SYS_ADMIN"] => check(
            "privileges",
            Status::Warning,
            "root without CAP_SYS_ADMIN: no namespaces, runs fall back to chroot",
            Some("in Docker: --cap-add SYS_ADMIN --security-opt seccomp=unconfined --security-opt apparmor=unconfined, or --privileged".into()),
        ),
        _ => check(
            "privileges",
            Status::Failed,
            format!("root but missing {}", missing.join(", ")),
            Some("in Docker keep the default capabilities (no --cap-drop ALL) and add SYS_ADMIN, or run --privileged".into()),
        ),
    }
}

/// Whether networked runs get the nftables guard: tried for real (a table created and
/// deleted).
fn network_guard_check(config: &Config, root: bool, pm: PackageManager) -> Check {
    const NAME: &str = "network guard";
    if !config.enable_network {
        return ok(NAME, "enable_network is false: runs have no network at all");
    }
    if config.network_deny.is_empty() {
        return check(
            NAME,
            Status::Warning,
            "network_deny is empty: networked runs can reach the host's loopback services and cloud metadata",
            Some("remove the empty network_deny / NETWORK_DENY to get the default list".into()),
        );
    }
    if !root {
        return check(
            NAME,
            Status::Warning,
            "not root: no guard; networked runs reach whatever this user can",
            Some("run as root (sudo sandbox ...)".into()),
        );
    }
    let denied = config
        .network_deny
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    match crate::isolation::netguard::NetGuard::install(
        &config.network_deny,
        crate::isolation::uids::SANDBOX_UIDS,
    ) {
        Ok(_guard) => ok(
            NAME,
            format!("nftables rejects {denied} for networked runs"),
        ),
        Err(e) => check(
            NAME,
            Status::Warning,
            e.to_string(),
            Some(pm.install(Need::Nftables)),
        ),
    }
}

/// Where the interpreter's one exec pointer can live (see `isolation::sys::empty_path`).
fn exec_lock_check(root: bool, caps: u64, min: Option<u64>) -> Check {
    const CAP_SYS_RAWIO: u32 = 17;
    let rawio = caps & (1u64 << CAP_SYS_RAWIO) != 0;
    match min {
        Some(m) if m >= 4096 && root && rawio => ok(
            "exec lock",
            format!(
                "the one exec the filter admits points below vm.mmap_min_addr ({m}), where no snippet can map"
            ),
        ),
        Some(m) if m >= 4096 => check(
            "exec lock",
            Status::Warning,
            "no CAP_SYS_RAWIO: the one exec the filter admits points to a random page (a snippet would have to guess it among 2^34)",
            Some("run as root; in Docker add --cap-add SYS_RAWIO".into()),
        ),
        _ => check(
            "exec lock",
            Status::Warning,
            format!(
                "vm.mmap_min_addr is {}: the one exec the filter admits points to a random page (a snippet would have to guess it among 2^34)",
                min.map_or_else(|| "unreadable".to_string(), |m| m.to_string())
            ),
            Some("sysctl -w vm.mmap_min_addr=65536 (and persist it in /etc/sysctl.d)".into()),
        ),
    }
}

fn libseccomp_check(pm: PackageManager) -> Check {
    match libseccomp::ScmpVersion::current() {
        Ok(v) if (v.major, v.minor) >= (2, 5) => {
            ok("libseccomp", format!("{}.{}.{}", v.major, v.minor, v.micro))
        }
        Ok(v) => check(
            "libseccomp",
            Status::Failed,
            format!(
                "{}.{}.{} is too old: 2.5 or later is needed",
                v.major, v.minor, v.micro
            ),
            Some(pm.install(Need::Libseccomp)),
        ),
        Err(e) => check(
            "libseccomp",
            Status::Failed,
            format!("cannot tell its version: {e}"),
            Some(pm.install(Need::Libseccomp)),
        ),
    }
}

fn build_checks(pm: PackageManager) -> Vec<Check> {
    let mut checks = Vec::new();
    checks.push(
        match output_of("pkg-config", &["--modversion", "libseccomp"]) {
            Ok(v) => ok("pkg-config libseccomp", format!("{v} (for building)")),
            Err(e) => {
                let detail = if output_of("pkg-config", &["--version"]).is_err() {
                    "pkg-config is not installed (needed for building only)".to_string()
                } else {
                    format!("libseccomp.pc not found (needed for building only): {e}")
                };
                check(
                    "pkg-config libseccomp",
                    Status::Warning,
                    detail,
                    Some(pm.install(Need::LibseccompDev)),
                )
            }
        },
    );
    checks.push(match output_of("gcc", &["--version"]) {
        Ok(v) => ok(
            "gcc",
            format!("{} (for building)", v.lines().next().unwrap_or("").trim()),
        ),
        Err(e) => check(
            "gcc",
            Status::Warning,
            format!("not usable (needed for building only): {e}"),
            Some(pm.install(Need::Gcc)),
        ),
    });
    checks
}

fn isolation_checks(report: &detect::HostReport) -> Vec<Check> {
    let mut checks = Vec::new();
    checks.push(match &report.seccomp {
        Ok(()) => ok("kernel seccomp", "seccomp filters with the errno action"),
        Err(e) => check(
            "kernel seccomp",
            Status::Failed,
            e.clone(),
            Some("use a kernel built with CONFIG_SECCOMP=y and CONFIG_SECCOMP_FILTER=y".into()),
        ),
    });
    let ns_fix = "in Docker: --privileged, or --cap-add SYS_ADMIN --security-opt seccomp=unconfined --security-opt apparmor=unconfined";
    checks.push(match (&report.namespaces, &report.chroot) {
        (Ok(()), _) if report.root => ok(
            "namespaces",
            "mount, pid, ipc, uts, net and a private tmpfs",
        ),
        (Ok(()), _) => ok(
            "namespaces",
            "user namespace, then mount, pid, ipc, uts, net and a private tmpfs",
        ),
        (Err(n), Ok(())) => check(
            "namespaces",
            Status::Warning,
            format!("not permitted ({n}): runs fall back to chroot + setuid + seccomp"),
            Some(ns_fix.into()),
        ),
        (Err(n), Err(c)) => check(
            "namespaces",
            Status::Failed,
            format!("not permitted ({n}), and chroot neither ({c})"),
            Some(format!("{ns_fix}; at least keep CAP_SYS_CHROOT")),
        ),
    });
    checks.push(match &report.cgroup {
        Ok(d) => ok("cgroups", format!("{d}, writable")),
        Err(e) => check(
            "cgroups",
            Status::Warning,
            format!("{e}: memory and process limits fall back to rlimits"),
            Some(if report.root {
                "mount a writable cgroup v2 at /sys/fs/cgroup (in Docker: --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:rw)".into()
            } else {
                "run as root (sudo sandbox ...)".into()
            }),
        ),
    });
    checks
}

fn state_dir_check(config: &Config) -> Check {
    let state_dir = &config.state_dir;
    let fix = Some("set state_dir / SANDBOX_STATE_DIR to a directory root can write".to_string());
    let mount_dir = config.mount_dir();
    if let Err(e) = std::fs::create_dir_all(&mount_dir) {
        return check(
            "state directory",
            Status::Failed,
            format!("cannot create {}: {e}", mount_dir.display()),
            fix,
        );
    }
    let probe = state_dir.join(format!(".doctor-{}", std::process::id()));
    let written = std::fs::write(&probe, b"ok");
    let _ = std::fs::remove_file(&probe);
    match written {
        Ok(()) => ok(
            "state directory",
            format!("{} is writable", state_dir.display()),
        ),
        Err(e) => check(
            "state directory",
            Status::Failed,
            format!("cannot write in {}: {e}", state_dir.display()),
            fix,
        ),
    }
}

fn interpreter_checks(config: &Config, pm: PackageManager) -> Vec<Check> {
    let mut checks = Vec::new();
    let sys = &config.system_lib_requirements;
    match python::discover(&config.python_path, sys) {
        Ok(rt) => {
            checks.push(ok(
                "python",
                format!(
                    "{} {} runs and imports json",
                    rt.program.display(),
                    rt.version
                ),
            ));
            for (m, present) in &rt.modules {
                checks.push(if *present {
                    ok(&format!("python module {m}"), "importable")
                } else {
                    check(
                        &format!("python module {m}"),
                        Status::Warning,
                        "not importable (snippets that use it will fail)",
                        Some(format!("{} -m pip install {m}", rt.program.display())),
                    )
                });
            }
        }
        // Python is the language Dify uses most: its absence always fails.
        Err(e) => checks.push(check(
            "python",
            Status::Failed,
            e.to_string(),
            Some(format!(
                "{}, or set python_path / PYTHON_PATH to a working python3",
                pm.install(Need::Python)
            )),
        )),
    }
    match nodejs::discover(&config.nodejs_path, sys) {
        Ok(rt) => checks.push(ok(
            "nodejs",
            format!("{} {} runs", rt.program.display(), rt.version),
        )),
        Err(e) => {
            // Left to the default, a missing Node only disables nodejs runs.
            let (status, detail) = if config.nodejs_path_explicit {
                (Status::Failed, e.to_string())
            } else {
                (Status::Warning, format!("{e}; nodejs runs are disabled"))
            };
            checks.push(check(
                "nodejs",
                status,
                detail,
                Some(format!(
                    "{}, or set nodejs_path / NODEJS_PATH to a working node",
                    pm.install(Need::Node)
                )),
            ));
        }
    }
    checks
}

/// A minimal HTTP/1.0 GET over an already connected stream; true on a 200 answer.
fn http_ok<S: Read + Write>(mut stream: S, path: &str) -> bool {
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 32];
    let mut got = 0;
    while got < head.len() {
        match stream.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let head = String::from_utf8_lossy(&head[..got]);
    head.starts_with("HTTP/1.") && head.split_whitespace().nth(1) == Some("200")
}

fn port_check(port: u16) -> Check {
    let fix = format!(
        "stop what listens there (ss -ltnp 'sport = :{port}') or set app.port / SANDBOX_PORT"
    );
    match TcpListener::bind(("0.0.0.0", port)) {
        Ok(_) => ok("port", format!("{port} is free")),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let is_sandbox =
                connect_tcp(&format!("127.0.0.1:{port}")).is_ok_and(|s| http_ok(s, "/health"));
            if is_sandbox {
                check(
                    "port",
                    Status::Warning,
                    format!(
                        "{port} is in use by a server answering /health (a running sandbox serve?)"
                    ),
                    Some(fix),
                )
            } else {
                check(
                    "port",
                    Status::Failed,
                    format!("{port} is in use by another program"),
                    Some(fix),
                )
            }
        }
        Err(e) => check(
            "port",
            Status::Failed,
            format!("cannot listen on {port}: {e}"),
            Some(fix),
        ),
    }
}

/// Where a Docker engine may listen: DOCKER_HOST, else the usual sockets.
fn docker_endpoints() -> Vec<String> {
    if let Ok(host) = std::env::var("DOCKER_HOST")
        && !host.is_empty()
    {
        return vec![host];
    }
    let mut v = vec![
        "unix:///var/run/docker.sock".to_string(),
        "unix:///run/docker.sock".to_string(),
    ];
    if let Ok(dir) = std::env::var("XDG_RUNTIME_DIR") {
        v.push(format!("unix://{dir}/docker.sock"));
    }
    if let Ok(home) = std::env::var("HOME") {
        v.push(format!("unix://{home}/.docker/run/docker.sock"));
    }
    v
}

/// How long a probe connection may take to connect, and each read or write.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Connect to `hostport`, reads and writes bounded by `PROBE_TIMEOUT`.
fn connect_tcp(hostport: &str) -> Result<TcpStream, String> {
    let addr = hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("cannot resolve {hostport}"))?;
    let s =
        TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).map_err(|e| format!("{hostport}: {e}"))?;
    let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
    let _ = s.set_write_timeout(Some(PROBE_TIMEOUT));
    Ok(s)
}

fn docker_ping(endpoint: &str) -> Result<(), String> {
    if let Some(path) = endpoint.strip_prefix("unix://") {
        let s = UnixStream::connect(path).map_err(|e| format!("{path}: {e}"))?;
        let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
        let _ = s.set_write_timeout(Some(PROBE_TIMEOUT));
        return if http_ok(s, "/_ping") {
            Ok(())
        } else {
            Err(format!("{path} did not answer /_ping"))
        };
    }
    if let Some(hostport) = endpoint.strip_prefix("tcp://") {
        let s = connect_tcp(hostport)?;
        return if http_ok(s, "/_ping") {
            Ok(())
        } else {
            Err(format!(
                "{hostport} did not answer /_ping (TLS endpoints are not checked)"
            ))
        };
    }
    Err(format!("{endpoint}: only unix:// and tcp:// are checked"))
}

fn docker_check(pm: PackageManager) -> Check {
    let mut errors = Vec::new();
    for endpoint in docker_endpoints() {
        match docker_ping(&endpoint) {
            Ok(()) => {
                return ok(
                    "docker",
                    format!("engine answers at {endpoint} (for the xtask)"),
                );
            }
            Err(e) => errors.push(e),
        }
    }
    check(
        "docker",
        Status::Warning,
        format!(
            "no engine reachable (needed only for cargo xtask): {}",
            errors.join("; ")
        ),
        Some(format!(
            "{} && systemctl start docker, or set DOCKER_HOST",
            pm.install(Need::Docker)
        )),
    )
}

pub fn run_checks(config_path: Option<&Path>) -> Report {
    let (distribution, pm) = PackageManager::detect();
    let (mut checks, config) = config_check(config_path);
    let Some(config) = config else {
        return Report {
            distribution,
            package_manager: pm,
            checks,
            isolation: None,
            isolation_error: Some("the configuration does not load".into()),
            ok: false,
        };
    };
    let state = state_dir_check(&config);
    let probe = detect::probe(&config.mount_dir());
    let host_report = &probe.report;
    let caps = effective_caps().unwrap_or(0);
    checks.push(privileges_check(
        host_report.root,
        caps,
        &host_report.namespaces,
    ));
    checks.push(exec_lock_check(
        host_report.root,
        caps,
        host_report.mmap_min_addr,
    ));
    checks.push(libseccomp_check(pm));
    checks.extend(isolation_checks(host_report));
    checks.push(state);
    checks.extend(interpreter_checks(&config, pm));
    checks.push(network_guard_check(&config, host_report.root, pm));
    checks.push(port_check(config.port));
    checks.extend(build_checks(pm));
    checks.push(docker_check(pm));
    let (isolation, isolation_error) = match detect::decide(
        probe,
        config
            .force_chroot
            .then_some(crate::isolation::spec::IsolationLevel::Chroot),
    ) {
        Ok(host) => (Some(host.level.describe().to_string()), None),
        Err(e) => (None, Some(e.to_string())),
    };
    Report {
        distribution,
        package_manager: pm,
        ok: checks.iter().all(|c| c.status != Status::Failed),
        checks,
        isolation,
        isolation_error,
    }
}

/// Human output: one line per check, its fix below it; colour only on a terminal.
pub fn render(report: &Report, colour: bool) -> String {
    let paint = |code: &str, text: &str| {
        if colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    };
    let width = report
        .checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    out.push_str(&format!(
        "host: {} (fixes use {})\n",
        report.distribution,
        report.package_manager.as_str()
    ));
    for c in &report.checks {
        let tag = match c.status {
            Status::Ok => paint("32", "ok     "),
            Status::Warning => paint("33", "warning"),
            Status::Failed => paint("31;1", "failed "),
        };
        out.push_str(&format!("{tag}  {:width$}  {}\n", c.name, c.detail));
        if let Some(fix) = &c.fix
            && c.status != Status::Ok
        {
            out.push_str(&format!("         {:width$}  fix: {fix}\n", ""));
        }
    }
    match (&report.isolation, &report.isolation_error) {
        (Some(level), _) => out.push_str(&format!("serve would isolate runs with: {level}\n")),
        (None, Some(e)) => out.push_str(&format!("serve could not start here: {e}\n")),
        (None, None) => out.push_str("serve could not start here\n"),
    }
    let failed = report
        .checks
        .iter()
        .filter(|c| c.status == Status::Failed)
        .count();
    let summary = if failed == 0 {
        paint("32", "all required checks passed")
    } else {
        paint("31;1", &format!("{failed} required check(s) failed"))
    };
    out.push_str(&summary);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributions_map_to_their_package_manager() {
        let cases = [
            ("ID=debian\nVERSION_ID=\"12\"\n", PackageManager::Apt),
            ("ID=ubuntu\nID_LIKE=debian\n", PackageManager::Apt),
            (
                "ID=linuxmint\nID_LIKE=\"ubuntu debian\"\n",
                PackageManager::Apt,
            ),
            ("ID=fedora\nVERSION_ID=40\n", PackageManager::Dnf),
            (
                "ID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\nVERSION_ID=\"9.3\"\n",
                PackageManager::Dnf,
            ),
            (
                "ID=\"centos\"\nID_LIKE=\"rhel fedora\"\nVERSION_ID=\"7\"\n",
                PackageManager::Yum,
            ),
            ("ID=alpine\nVERSION_ID=3.20.0\n", PackageManager::Apk),
            ("ID=arch\n", PackageManager::Pacman),
            ("ID=nixos\n", PackageManager::Unknown),
            ("", PackageManager::Unknown),
        ];
        for (text, pm) in cases {
            assert_eq!(PackageManager::from_os_release(text).1, pm, "{text}");
        }
    }

    #[test]
    fn fixes_name_the_distribution_packages() {
        assert_eq!(
            PackageManager::Apt.install(Need::LibseccompDev),
            "apt-get install -y libseccomp-dev pkg-config"
        );
        assert_eq!(
            PackageManager::Dnf.install(Need::LibseccompDev),
            "dnf install -y libseccomp-devel pkgconf-pkg-config"
        );
        assert_eq!(
            PackageManager::Apk.install(Need::Libseccomp),
            "apk add libseccomp"
        );
        assert!(
            PackageManager::Pacman
                .install(Need::Gcc)
                .starts_with("pacman -S")
        );
    }

    #[test]
    fn plain_output_has_no_colour_codes() {
        let report = Report {
            distribution: "Debian".into(),
            package_manager: PackageManager::Apt,
            checks: vec![
                ok("a", "fine"),
                check("b", Status::Failed, "broken", Some("do this".into())),
            ],
            isolation: None,
            isolation_error: Some("not root".into()),
            ok: false,
        };
        let plain = render(&report, false);
        assert!(!plain.contains('\x1b'), "{plain}");
        assert!(plain.contains("failed   b  broken"), "{plain}");
        assert!(plain.contains("fix: do this"), "{plain}");
        assert!(render(&report, true).contains("\x1b[31;1m"));
    }
}
