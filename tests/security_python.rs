//! The security corpus for Python, run for real (as root) against `sandbox serve`.
//! Every attack must be contained and the server must stay healthy.

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use common::Server;
use serde_json::{Value, json};

fn error(data: &Value) -> String {
    data["error"].as_str().unwrap_or_default().to_string()
}

fn out(data: &Value) -> String {
    data["stdout"].as_str().unwrap_or_default().to_string()
}

async fn assert_eperm(s: &Server, code: &str) {
    let data = s.python(code).await;
    assert_ne!(data["exit_code"], 0, "{code} -> {data}");
    assert!(
        error(&data).contains("operation not permitted"),
        "{code} -> {data}"
    );
    assert!(s.healthy().await);
}

#[tokio::test]
async fn exec_and_process_creation_are_refused() {
    let s = Server::start(&[]).await;
    for code in [
        "import os\nos.execv('/bin/sh', ['sh'])",
        "import os\nos.execve('/root/.pyenv/versions/3.11.7/bin/python3', ['python3', '-c', 'print(1)'], {})",
        "import subprocess\nsubprocess.run(['ls', '/'])",
        "import os\nos.fork()",
        "import os\nos.posix_spawn('/bin/true', ['true'], {})",
        "import multiprocessing\np = multiprocessing.Process(target=print)\np.start()\np.join()",
    ] {
        assert_eperm(&s, code).await;
    }
    // os.system reports the failure as a status instead of raising.
    let data = s.python("import os\nprint(os.system('echo pwned'))").await;
    assert!(!out(&data).contains("pwned"), "{data}");
    assert_ne!(out(&data).trim(), "0", "{data}");
}

#[tokio::test]
async fn execveat_cannot_be_reused_by_the_snippet() {
    let s = Server::start(&[]).await;
    // The one exec the filter allows is on fd 1023 with the helper's own pathname
    // pointer: the descriptor is gone and the pointer cannot match. A call that does not
    // match is refused (EPERM, a fork server's run) or ends the run (SIGSYS, a helper's
    // run: see `a_wrong_exec_pointer_ends_the_run`), one run per call.
    for (fd, path) in [
        ("1023", "b''"),
        ("1023", "sys.executable.encode()"),
        ("-100", "sys.executable.encode()"),
    ] {
        let code = format!(
            r#"
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
argv = (ctypes.c_char_p * 2)(sys.executable.encode(), None)
r = libc.syscall(322, {fd}, {path}, argv, None, 0x1000)
print("execveat", r, ctypes.get_errno())
"#
        );
        let data = s.python(&code).await;
        let text = out(&data);
        let refused = text.contains("execveat -1 1\n") || text.contains("execveat -1 9\n");
        let killed = data["exit_code"] == 159 && !text.contains("execveat");
        assert!(refused || killed, "EPERM, EBADF or SIGSYS expected: {data}");
    }
    let data = s
        .python("import os, sys\nfd = os.open(sys.executable, os.O_RDONLY)\ntry:\n    os.dup2(fd, 1023)\n    print('dup2 ok')\nexcept OSError as e:\n    print('dup2', e.errno)")
        .await;
    assert!(
        out(&data).contains("dup2 9"),
        "RLIMIT_NOFILE keeps fd 1023 out of reach: {data}"
    );
}

#[tokio::test]
async fn a_wrong_exec_pointer_ends_the_run() {
    // A helper's run: its filter admits execveat(1023, <the exec page>, .., AT_EMPTY_PATH).
    // With an absolute path written on that page the kernel ignores the descriptor, so the
    // page must stay unknown. Were a wrong pointer answered with EPERM, the admitted one
    // would stand out (it gets past the filter: EFAULT) and the random page a server
    // without CAP_SYS_RAWIO draws would be found at one system call per guess, once for
    // every run of that server. A wrong pointer must end the run instead.
    let s = Server::start(&[("PYTHON_FORK_SERVER", "false")]).await;
    let code = r#"
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
print("probing", flush=True)
for page in range(1 << 32, (1 << 32) + 64 * 4096, 4096):
    r = libc.syscall(322, 1023, page, None, None, 0x1000)
    print("survived", hex(page), r, ctypes.get_errno(), flush=True)
"#;
    let data = s.python(code).await;
    let text = out(&data);
    assert!(text.contains("probing"), "{data}");
    assert!(
        !text.contains("survived"),
        "a wrong pointer was answered: {data}"
    );
    assert_eq!(data["exit_code"], 159, "{data}");
    assert!(
        error(&data).contains("killed by the seccomp filter"),
        "{data}"
    );
    assert!(s.healthy().await);
}

#[tokio::test]
async fn the_one_admitted_exec_pointer_lies_where_no_snippet_can_map() {
    // As root on a host with vm.mmap_min_addr >= 4096 (every distribution's default) the
    // helper's empty pathname sits just below mmap_min_addr. The filter admits that very
    // pointer, so the call gets past seccomp, but the kernel cannot read a path there:
    // EFAULT. Mapping the page to plant a path is refused: EPERM.
    let min: u64 = std::fs::read_to_string("/proc/sys/vm/mmap_min_addr")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        min >= 4096,
        "this test needs vm.mmap_min_addr >= 4096, got {min}"
    );
    let page = (min - 1) & !0xfff;
    let s = Server::start(&[]).await;
    let code = format!(
        r#"
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
argv = (ctypes.c_char_p * 2)(sys.executable.encode(), None)
r = libc.syscall(322, 1023, ctypes.c_void_p({page} + 8), argv, None, 0x1000)
print("execveat", r, ctypes.get_errno())
MAP_FIXED_NOREPLACE = 0x100000
p = libc.mmap({page}, 4096, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
print("mmap", p == ctypes.c_void_p(-1).value, ctypes.get_errno())
"#
    );
    let data = s.python(&code).await;
    let text = out(&data);
    // EFAULT from the helper's admitted pointer; EPERM in a fork server's run, whose
    // filter refuses every exec.
    assert!(
        text.contains("execveat -1 14\n") || text.contains("execveat -1 1\n"),
        "EFAULT or EPERM expected: {text}"
    );
    assert!(text.contains("mmap True 1\n"), "EPERM expected: {text}");
}

#[tokio::test]
async fn host_files_are_not_visible() {
    let planted = std::path::Path::new("/etc/sandbox-test-planted-secret");
    std::fs::write(planted, "top secret").unwrap();
    let s = Server::start(&[]).await;
    let code = r#"
import os
for p in ['/etc/shadow', '/etc/sandbox-test-planted-secret', '/root/.bash_history', '/var/lib/sandbox/uids', '/home', '/sys/kernel']:
    print(p, os.path.exists(p))
print(open('/etc/passwd').read())
# Of the state directory only the package directory is visible (read-only).
print(os.listdir('/var/lib/sandbox'))
"#;
    let data = s.python(code).await;
    let _ = std::fs::remove_file(planted);
    let text = out(&data);
    for line in text.lines().take(6) {
        assert!(line.ends_with("False"), "{text}");
    }
    assert!(
        !text.contains("daemon:"),
        "the host's passwd must not show: {text}"
    );
    assert!(text.contains("sandbox:x:"), "{text}");
    assert!(text.ends_with("['python-packages']\n"), "{text}");
}

#[tokio::test]
async fn other_processes_are_invisible_in_proc() {
    let s = Server::start(&[]).await;
    let code = format!(
        "import os\nprint(sorted(p for p in os.listdir('/proc') if p.isdigit()))\nprint(os.path.exists('/proc/{}/environ'))\nprint(os.getpid())",
        s.pid()
    );
    let data = s.python(&code).await;
    // The run and its init (pid 1 of the namespace), nothing else.
    assert_eq!(out(&data), "['1', '2']\nFalse\n2\n", "{data}");
}

#[tokio::test]
async fn privilege_changes_are_refused() {
    let s = Server::start(&[]).await;
    let data = s.python("import os\nprint(os.getuid(), os.geteuid(), os.getgid(), os.getgroups())\nos.setuid(0)").await;
    let text = out(&data);
    let ids: Vec<&str> = text.split_whitespace().collect();
    assert!(ids[0].parse::<u32>().unwrap() >= 10000, "{data}");
    assert_eq!(ids[0], ids[1]);
    assert!(out(&data).contains("[]"), "no supplementary groups: {data}");
    assert!(error(&data).contains("operation not permitted"), "{data}");
}

#[tokio::test]
async fn raw_syscalls_through_ctypes_are_refused() {
    let s = Server::start(&[]).await;
    // x86_64 numbers: mount, ptrace, unshare, bpf, keyctl, reboot, setns, init_module,
    // perf_event_open, userfaultfd, io_uring_setup, chroot, pivot_root, clone (no THREAD).
    let code = r#"
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
calls = {"mount": (165, b"none", b"/tmp", b"tmpfs", 0, 0), "ptrace": (101, 16, 1, 0, 0),
         "unshare": (272, 0x20000), "bpf": (321, 0, 0, 0), "keyctl": (250, 0, 0, 0),
         "reboot": (169, 0xfee1dead, 672274793, 0x1234567, 0), "setns": (308, 0, 0),
         "init_module": (175, 0, 0, b""), "perf_event_open": (298, 0, 0, -1, -1, 0),
         "userfaultfd": (323, 0), "io_uring_setup": (425, 1, 0), "chroot": (161, b"/tmp"),
         "pivot_root": (155, b"/tmp", b"/tmp"), "clone": (56, 17, 0, 0, 0, 0)}
for name, args in calls.items():
    r = libc.syscall(*args)
    print(name, r, ctypes.get_errno())
"#;
    let data = s.python(code).await;
    let text = out(&data);
    assert_eq!(text.lines().count(), 14, "{data}");
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(parts[1], "-1", "{line}");
        // EPERM from the filter, or ENOSYS for io_uring_setup (so runtimes fall back).
        assert!(
            parts[2] == "1" || (parts[0] == "io_uring_setup" && parts[2] == "38"),
            "{line}"
        );
    }
    assert!(s.healthy().await);
}

#[tokio::test]
async fn sockets_need_enable_network() {
    common::netlab::lab();
    let (host, port) = (common::netlab::EXT, common::netlab::TCP_PORT);
    let s = Server::start(&[]).await;
    let code = format!(
        "import socket\ns = socket.create_connection(('{host}', {port}), timeout=2)\nprint('connected')"
    );
    assert_eperm(&s, &code).await;
    let (_, env) = s
        .run_json(json!({"language": "python3", "code": code, "enable_network": true}))
        .await;
    assert_eq!(
        env["data"]["stdout"], "connected\n",
        "with network the same code connects: {env}"
    );
}

#[tokio::test]
async fn with_network_only_ip_and_own_unix_sockets_exist() {
    use std::os::linux::net::SocketAddrExt;
    // A host service on an abstract Unix socket (container runtimes use these): a run
    // with network has a network namespace of its own, where the name does not exist.
    let name = format!("sandbox-test-abstract-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    let s = Server::start(&[]).await;
    let code = format!(
        r#"
import socket
for family, target in [(socket.AF_UNIX, "\0{name}"), (socket.AF_NETLINK, None), (socket.AF_PACKET, None)]:
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM if family != socket.AF_UNIX else socket.SOCK_STREAM)
        if target:
            sock.connect(target)
        print(family, 'OPEN')
    except OSError as e:
        print(family, e.errno)
ip = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
print('ip ok')
"#
    );
    let (_, env) = s
        .run_json(json!({"language": "python3", "code": code, "enable_network": true}))
        .await;
    let text = env["data"]["stdout"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!text.contains("OPEN"), "{env}");
    assert!(
        text.starts_with("1 111\n"),
        "the host's name is not there: {env}"
    );
    assert_eq!(
        text.lines().filter(|l| l.ends_with(" 1")).count(),
        2,
        "EPERM for netlink and packet sockets: {env}"
    );
    assert!(text.ends_with("ip ok\n"), "{env}");
}

#[tokio::test]
async fn only_tmp_is_writable() {
    let s = Server::start(&[]).await;
    let code = r#"
import os, sys
for p in ['/x', '/etc/x', os.path.dirname(os.__file__) + '/x', '/proc/x', '/dev/x']:
    try:
        open(p, 'w').write('x')
        print(p, 'WROTE')
    except OSError as e:
        print(p, 'refused', e.errno)
open('/tmp/ok', 'w').write('fine')
print(open('/tmp/ok').read())
"#;
    let data = s.python(code).await;
    let text = out(&data);
    assert!(!text.contains("WROTE"), "{text}");
    assert!(text.ends_with("fine\n"), "{text}");
}

#[tokio::test]
async fn tmp_is_private_to_each_run_and_invisible_on_the_host() {
    let s = Server::start(&[]).await;
    let marker = format!("sandbox-marker-{}", std::process::id());
    let first = s
        .python(&format!(
            "open('/tmp/{marker}', 'w').write('x')\nimport os\nprint(os.listdir('/tmp'))"
        ))
        .await;
    assert!(out(&first).contains(&marker), "{first}");
    let second = s
        .python(&format!(
            "import os\nprint(os.path.exists('/tmp/{marker}'), os.listdir('/tmp'))"
        ))
        .await;
    assert_eq!(out(&second), "False []\n");
    assert!(!std::path::Path::new("/tmp").join(&marker).exists());
}

#[tokio::test]
async fn fork_and_thread_storms_are_contained() {
    let s = Server::start(&[("MAX_PROCESSES", "32")]).await;
    let fork_storm = "import os\nn = 0\nfor _ in range(200):\n    try:\n        os.fork(); n += 1\n    except OSError:\n        pass\nprint('forks', n)";
    let data = s.python(fork_storm).await;
    assert_eq!(out(&data), "forks 0\n");
    let thread_storm = "import threading, time\nts = []\nfor _ in range(500):\n    t = threading.Thread(target=time.sleep, args=(2,))\n    t.start(); ts.append(t)\nprint('started all')";
    let data = s.python(thread_storm).await;
    assert_ne!(data["exit_code"], 0, "{data}");
    assert!(!out(&data).contains("started all"), "{data}");
    assert!(error(&data).contains("process limit"), "{data}");
    assert!(s.healthy().await);
}

#[tokio::test]
async fn a_memory_bomb_hits_the_memory_limit() {
    let s = Server::start(&[("MEMORY_LIMIT_MB", "128")]).await;
    let data = s
        .python("blocks = []\nwhile True:\n    blocks.append(bytearray(8 << 20))")
        .await;
    assert_ne!(data["exit_code"], 0);
    assert!(error(&data).contains("memory limit"), "{data}");
    assert!(s.healthy().await);
    assert_eq!(out(&s.python("print('ok')").await), "ok\n");
}

#[tokio::test]
async fn an_output_flood_hits_the_output_limit() {
    let s = Server::start(&[("MAX_OUTPUT_BYTES", "1000000")]).await;
    let data = s.python("while True:\n    print('x' * 999)").await;
    assert!(error(&data).contains("output limit"), "{data}");
    assert_eq!(out(&data).len(), 1_000_000);
    assert_ne!(data["exit_code"], 0);
    assert!(s.healthy().await);
}

#[tokio::test]
async fn a_disk_fill_stops_at_the_tmp_size() {
    let s = Server::start(&[("TMP_SIZE_MB", "8")]).await;
    let code = "n = 0\ntry:\n    with open('/tmp/fill', 'wb') as f:\n        while True:\n            f.write(b'x' * (1 << 20)); f.flush(); n += 1\nexcept OSError as e:\n    print('stopped', e.errno, n)";
    let data = s.python(code).await;
    let text = out(&data);
    assert!(text.starts_with("stopped"), "{data}");
    let mb: u64 = text.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(mb <= 8, "{text}");
    assert!(s.healthy().await);
}

#[tokio::test]
async fn concurrent_runs_cannot_see_or_kill_each_other() {
    let s = Server::start(&[]).await;
    let victim = "import os, time\nopen('/tmp/victim', 'w').write('mine')\ntime.sleep(1.5)\nprint('survived', os.getuid(), open('/tmp/victim').read())";
    let attacker = r#"
import os, signal, time
time.sleep(0.3)
print('uid', os.getuid())
print('victim file', os.path.exists('/tmp/victim'))
try:
    os.kill(-1, signal.SIGKILL)
    print('kill -1 sent')
except OSError as e:
    print('kill -1', e.errno)
hits = 0
for pid in range(1, 4000):
    if pid == os.getpid():
        continue
    try:
        os.kill(pid, signal.SIGKILL); hits += 1
    except OSError:
        pass
print('killed', hits)
"#;
    let (v, a) = tokio::join!(s.python(victim), s.python(attacker));
    let v_out = out(&v);
    let a_out = out(&a);
    assert!(v_out.starts_with("survived"), "victim: {v} attacker: {a}");
    assert!(v_out.ends_with("mine\n"));
    assert!(a_out.contains("victim file False"), "{a_out}");
    assert!(a_out.contains("killed 0"), "{a_out}");
    let victim_uid = v_out.split_whitespace().nth(1).unwrap();
    let attacker_uid = a_out
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap();
    assert_ne!(victim_uid, attacker_uid);
    assert!(s.healthy().await);
}

#[tokio::test]
async fn extra_syscalls_open_exactly_what_the_operator_names() {
    let code = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.syscall(309, 0, 0, 0), ctypes.get_errno())";
    let default = Server::start(&[]).await;
    assert_eq!(
        out(&default.python(code).await),
        "-1 1\n",
        "getcpu is outside the built-in policy"
    );
    let opened = Server::start(&[("EXTRA_SYSCALLS", "getcpu")]).await;
    assert_eq!(out(&opened.python(code).await), "0 0\n");
    // Everything else stays as it was.
    assert_eperm(&opened, "import os\nos.fork()").await;
}

#[tokio::test]
async fn a_timeout_after_a_thread_storm_names_both_limits() {
    let s = Server::start(&[("MAX_PROCESSES", "16"), ("WORKER_TIMEOUT", "1")]).await;
    // The storm fails at the process limit; the threads already started keep the
    // interpreter alive until the timeout kills it.
    let data = s
        .python("import threading, time\nfor _ in range(100):\n    threading.Thread(target=time.sleep, args=(10,)).start()")
        .await;
    assert_eq!(data["exit_code"], -1, "{data}");
    let e = error(&data);
    assert!(e.starts_with("timeout"), "{e}");
    assert!(
        e.contains("can't start new thread") && e.contains("process limit reached as well"),
        "{e}"
    );
}

#[tokio::test]
async fn procs_host_files_are_masked() {
    let s = Server::start(&[]).await;
    let code = r#"
import os
for name in ["cmdline", "kcore", "keys", "kallsyms", "modules", "timer_list", "sched_debug", "interrupts"]:
    p = "/proc/" + name
    if os.path.exists(p):
        try:
            print(name, len(open(p, "rb").read(4096)))
        except OSError as e:
            print(name, "err", e.errno)
for d in ["acpi", "scsi", "bus", "irq", "driver", "fs"]:
    p = "/proc/" + d
    if os.path.isdir(p):
        print(d, os.listdir(p))
"#;
    let d = s.python(code).await;
    let text = d["stdout"].as_str().unwrap().to_string();
    let host_cmdline = std::fs::read_to_string("/proc/cmdline").unwrap();
    assert!(!host_cmdline.trim().is_empty());
    assert!(text.contains("cmdline 0\n"), "{d}");
    for line in text.lines() {
        assert!(
            line.ends_with(" 0") || line.ends_with(" []") || line.contains(" err "),
            "shows something of the host: {line}"
        );
    }
}

#[tokio::test]
async fn a_syscall_through_a_refused_abi_is_named() {
    let s = Server::start(&[]).await;
    // getpid through the x32 ABI: the filter kills the process (SIGSYS).
    let d = s
        .python("import ctypes\nctypes.CDLL(None).syscall(0x40000000 + 39)\nprint('alive')")
        .await;
    assert_eq!(d["exit_code"], 159, "{d}");
    assert!(
        d["error"]
            .as_str()
            .unwrap()
            .contains("killed by the seccomp filter (SIGSYS)"),
        "{d}"
    );
}

#[tokio::test]
async fn the_spec_never_appears_on_a_command_line() {
    let proxy = "http://user:hunter2@proxy.invalid:3128";
    let s = Server::start(&[("HTTP_PROXY", proxy), ("WARM_WORKERS", "2")]).await;
    // Warm workers wait with their spec already received: read every helper's argv.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let mut helpers = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains("__exec") {
            helpers += 1;
            assert!(!text.contains("hunter2") && !text.contains("uid"), "{text}");
        }
    }
    assert!(helpers > 0, "no helper found");
    drop(s);
}

/// A mount beneath a directory the root binds (a volume under an interpreter's prefix,
/// say) must be as read-only in the run as the bind itself: on the fork server's path
/// and on a fresh interpreter's.
#[tokio::test]
async fn a_mount_beneath_the_roots_binds_is_read_only_too() {
    let beneath = "/usr/share/zoneinfo/Etc";
    let script =
        format!("mount -t tmpfs -o size=1m,mode=1777 sandbox-test {beneath} && exec \"$0\" \"$@\"");
    let prefix = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ];
    let code = format!(
        "import os\nprint(os.path.isdir('{beneath}'))\ntry:\n    open('{beneath}/written', 'w')\n    print('written')\nexcept OSError as e:\n    print('refused', e.errno)"
    );
    for fork_server in ["true", "false"] {
        let s = Server::start_under(&prefix, &[("PYTHON_FORK_SERVER", fork_server)]).await;
        let data = s.python(&code).await;
        // Read-only (30: EROFS), whether the tree beneath is seen or left out.
        let text = out(&data);
        assert!(
            text == "True\nrefused 30\n" || text.ends_with("refused 2\n"),
            "fork server {fork_server}: {data}"
        );
    }
}

/// A server started with signals ignored (a shell's background job ignores SIGINT and
/// SIGQUIT) passes none of that on: a run starts with what a fresh interpreter has.
#[tokio::test]
async fn a_run_starts_with_default_signal_dispositions() {
    let fresh = std::process::Command::new("/usr/bin/python3")
        .args([
            "-I",
            "-S",
            "-c",
            "print([l for l in open('/proc/self/status') if l.startswith('SigIgn')][0].split()[1])",
        ])
        .output()
        .expect("python3");
    let fresh = String::from_utf8_lossy(&fresh.stdout).to_string();
    let prefix = ["sh", "-c", "trap '' INT QUIT; exec \"$0\" \"$@\""];
    let code =
        "print([l for l in open('/proc/self/status') if l.startswith('SigIgn')][0].split()[1])";
    for fork_server in ["true", "false"] {
        let s = Server::start_under(
            &prefix,
            &[
                ("PYTHON_FORK_SERVER", fork_server),
                ("PYTHON_PATH", "/usr/bin/python3"),
            ],
        )
        .await;
        let data = s.python(code).await;
        assert_eq!(out(&data), fresh, "fork server {fork_server}: {data}");
    }
}
