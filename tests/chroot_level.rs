//! The degraded level (chroot + setuid + seccomp, no namespaces), forced on this host
//! with SANDBOX_ISOLATION=chroot: what an unprivileged container gets. The guarantees
//! that do not need namespaces must still hold.

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::Server;
use serde_json::json;

async fn chroot_server(extra: &[(&str, &str)]) -> (Server, tempfile::TempDir) {
    let state = tempfile::Builder::new()
        .prefix("sandbox-chroot-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mut env = vec![
        ("SANDBOX_ISOLATION", "chroot"),
        ("SANDBOX_STATE_DIR", state.path().to_str().unwrap()),
    ];
    env.extend_from_slice(extra);
    (Server::start(&env).await, state)
}

#[tokio::test]
async fn runs_work_and_forbidden_operations_fail() {
    let (s, _state) = chroot_server(&[]).await;
    assert_eq!(s.python("print('hi')").await["stdout"], "hi\n");
    assert_eq!(s.run("nodejs", "console.log('hi')").await["stdout"], "hi\n");
    for code in [
        "import os\nos.fork()",
        "import subprocess\nsubprocess.run(['id'])",
        "import os\nos.setuid(0)",
        "import socket\nsocket.socket()",
    ] {
        let data = s.python(code).await;
        assert!(
            data["error"]
                .as_str()
                .unwrap()
                .contains("operation not permitted"),
            "{code}: {data}"
        );
    }
    let data = s
        .run("nodejs", "require('child_process').execSync('id')")
        .await;
    assert!(data["error"].as_str().unwrap().contains("EPERM"), "{data}");
}

#[tokio::test]
async fn the_host_stays_out_of_reach() {
    let (s, _state) = chroot_server(&[]).await;
    let data = s
        .python("import os\nprint(os.path.exists('/etc/shadow'), os.path.exists('/home'), 'daemon:' in open('/etc/passwd').read(), os.getuid() >= 10000)\nopen('/etc/x', 'w')")
        .await;
    assert_eq!(data["stdout"], "False False False True\n", "{data}");
    assert_ne!(data["exit_code"], 0, "the root is not writable: {data}");
}

#[tokio::test]
async fn concurrent_runs_keep_their_files_apart() {
    let (s, _state) = chroot_server(&[]).await;
    let writer =
        "import os, time\nopen('secret', 'w').write('mine')\nprint(os.getcwd())\ntime.sleep(1)";
    let reader = r#"
import os, time
time.sleep(0.4)
found = []
try:
    names = os.listdir('/tmp')
except OSError:
    names = ['run-%d' % u for u in range(10000, 11000)]
for d in names:
    try:
        found += os.listdir('/tmp/' + d)
    except OSError:
        pass
print('secret' in found)
"#;
    let (w, r) = tokio::join!(s.python(writer), s.python(reader));
    assert!(
        w["stdout"].as_str().unwrap().starts_with("/tmp/run-"),
        "{w}"
    );
    assert_eq!(r["stdout"], "False\n", "{r}");
    // The next run does not inherit the private directory's content.
    let data = s.python("import os\nprint(os.listdir('.'))").await;
    assert_eq!(data["stdout"], "[]\n");
}

#[tokio::test]
async fn limits_still_apply() {
    let (s, _state) = chroot_server(&[("MEMORY_LIMIT_MB", "128"), ("WORKER_TIMEOUT", "1")]).await;
    let data = s
        .python("b = []\nwhile True: b.append(bytearray(8 << 20))")
        .await;
    assert!(
        data["error"].as_str().unwrap().contains("memory limit"),
        "{data}"
    );
    let (_, env) = s
        .run_json(json!({"language": "python3", "code": "while True: pass"}))
        .await;
    assert_eq!(env["data"]["exit_code"], -1, "{env}");
    assert!(s.healthy().await);
}

#[tokio::test]
async fn nothing_a_run_writes_outlives_it_or_reaches_another_run() {
    let (s, state) = chroot_server(&[]).await;
    // Everywhere a run might write outside its own directory.
    let writer = r#"
import os
tried = []
for d in ["/tmp", "/", "/etc", "/usr", "/dev", "/var/tmp", "/dev/shm", os.path.dirname(os.__file__)]:
    try:
        open(os.path.join(d, "leak"), "w").write("x")
        tried.append(d)
    except OSError:
        pass
open("mine", "w").write("mine")
print(tried, oct(os.stat("mine").st_mode & 0o777), oct(os.stat(".").st_mode & 0o777))
"#;
    let w = s.python(writer).await;
    assert_eq!(w["stdout"], "[] 0o600 0o700\n", "{w}");
    let reader = r#"
import os
try:
    print(os.listdir("/tmp"))
except OSError as e:
    print("listing /tmp:", e.errno)
print(os.listdir("."))
"#;
    let r = s.python(reader).await;
    assert_eq!(r["stdout"], "listing /tmp: 13\n[]\n", "{r}");
    // On the host too: the run's directory is gone, nothing of it left in the root.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let tmp = state.path().join("root-python3/tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        left.iter().all(|p| p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("run-"))),
        "{left:?}"
    );
    for dir in left {
        assert_eq!(
            std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0),
            0,
            "{dir:?}"
        );
    }
}

#[tokio::test]
async fn the_disk_a_run_fills_is_bounded_and_named() {
    let (s, _state) = chroot_server(&[("TMP_SIZE_MB", "8"), ("WORKER_TIMEOUT", "10")]).await;
    // Many files, each below the per-file limit: only the watch on the directory's size
    // can stop them. Far more than a busy machine could write in the watch's interval.
    let code = "chunk = b'x' * (1 << 20)\nfor i in range(2048):\n    open('f%d' % i, 'wb').write(chunk)\nprint('wrote all')";
    let data = s.python(code).await;
    let error = data["error"].as_str().unwrap();
    assert!(error.contains("disk limit reached"), "{data}");
    assert!(
        error.contains("at most 8 MB") && error.contains("tmp_size_mb"),
        "{data}"
    );
    assert_ne!(data["stdout"], "wrote all\n", "{data}");
    // One file past the size: the per-file limit answers, named the same way.
    let data = s.python("open('big', 'wb').write(b'x' * (9 << 20))").await;
    assert!(
        data["error"]
            .as_str()
            .unwrap()
            .contains("disk limit reached"),
        "{data}"
    );
}

/// The chroot level has no network namespace: every run, offline too, sits in the host's,
/// where the host's abstract Unix socket names are in reach. A service of the host's root
/// listening on one stands in for the host's own (a container shim, a desktop bus, X11).
#[tokio::test]
async fn no_run_at_the_chroot_level_reaches_the_hosts_abstract_unix_sockets() {
    use std::io::Write;
    use std::os::linux::net::SocketAddrExt;
    let name = format!("sandbox-chroot-abstract-{}", std::process::id());
    let addr =
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr).expect("bind");
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(b"host-service-as-root\n");
        }
    });
    let s = Server::start(&[("SANDBOX_ISOLATION", "chroot"), ("WARM_WORKERS", "0")]).await;
    let code = format!(
        r#"
import socket
u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    u.connect("\0{name}")
    print("reached", u.recv(100).decode().strip())
except OSError as e:
    print("refused", e)
"#
    );
    for network in [true, false] {
        let (status, body) = s
            .run_json(
                serde_json::json!({"language": "python3", "code": code, "enable_network": network}),
            )
            .await;
        assert_eq!(
            (status, &body["code"]),
            (200, &serde_json::json!(0)),
            "{body}"
        );
        let out = body["data"]["stdout"].as_str().unwrap_or_default();
        assert!(
            !out.contains("reached"),
            "a run (enable_network: {network}) at the chroot level reached a host service on \
             an abstract Unix socket: {}",
            body["data"]
        );
    }
}

/// The directory of the Python standard library the server's runs use (part of the
/// chroot level's root).
fn stdlib_dir() -> PathBuf {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['stdlib'])",
        ])
        .output()
        .expect("python3");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Removes a directory planted in the host's interpreter tree.
struct Planted(PathBuf);

impl Drop for Planted {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// With the state directory on the interpreter's filesystem, the root's files are hard
/// links to the host's (same inode). A world-writable file of the interpreter's tree
/// (harmless on the host behind /root, 0700) must reach the root as a copy the run cannot
/// write, never as a link through which it would change the host's file.
#[tokio::test]
async fn a_chroot_run_cannot_write_a_host_file_through_its_root() {
    let probe_dir = stdlib_dir().join(format!("sandbox_chroot_probe_{}", std::process::id()));
    std::fs::create_dir_all(&probe_dir).unwrap();
    let _planted = Planted(probe_dir.clone());
    let probe = probe_dir.join("probe.txt");
    std::fs::write(&probe, "original\n").unwrap();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o666)).unwrap();

    let (s, _state) = chroot_server(&[("WARM_WORKERS", "0")]).await;
    let code = format!(
        "p = {:?}\nprint(open(p).read().strip())\ntry:\n    open(p, 'a').write('written by a run\\n')\n    print('wrote')\nexcept OSError as e:\n    print('refused', e.errno)",
        probe.display().to_string()
    );
    let data = s.python(&code).await;
    let host = std::fs::read_to_string(&probe).unwrap();
    assert_eq!(
        host,
        "original\n",
        "a run changed the host's {} through its chroot root: {data}",
        probe.display()
    );
    // The file is in the root, readable, and refused for writing (EACCES).
    assert_eq!(data["stdout"], "original\nrefused 13\n", "{data}");
}

/// The /dev nodes are made with mknod, whose mode the server's umask (022) would cut to
/// 0644: runs (never root) must still write to /dev/null, as at every other level.
#[tokio::test]
async fn a_chroot_run_can_write_to_dev_null() {
    let (s, _state) = chroot_server(&[("WARM_WORKERS", "0")]).await;
    let data = s
        .python("import os\nwith open(os.devnull, 'w') as f:\n    f.write('x')\nprint('ok')")
        .await;
    assert_eq!(data["stdout"], "ok\n", "{data}");
    let data = s
        .run(
            "nodejs",
            "require('fs').writeFileSync('/dev/null', 'x'); console.log('ok')",
        )
        .await;
    assert_eq!(data["stdout"], "ok\n", "{data}");
}

/// The root is copied (linked) in the background at start; files that vanish while it is
/// walked (a `.pyc` written as a temporary file then renamed, an upgrade, a cache
/// cleaned) are skipped, and the language stays available.
#[tokio::test]
async fn a_file_vanishing_while_the_chroot_root_is_copied_does_not_disable_the_language() {
    let churn_dir = stdlib_dir().join(format!("sandbox_chroot_churn_{}", std::process::id()));
    std::fs::create_dir_all(&churn_dir).unwrap();
    let _planted = Planted(churn_dir.clone());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (dir, stop) = (churn_dir.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut round = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // What Python does for bytecode: temporary files, gone (renamed) soon after.
                let names: Vec<PathBuf> = (0..32)
                    .map(|i| dir.join(format!("mod{i}.cpython.pyc.{round}")))
                    .collect();
                for n in &names {
                    let _ = std::fs::write(n, b"x");
                }
                std::thread::sleep(Duration::from_millis(20));
                for n in &names {
                    let _ = std::fs::remove_file(n);
                }
                round += 1;
            }
        })
    };
    let (s, _state) = chroot_server(&[("WARM_WORKERS", "0")]).await;
    // The first run waits for the root: the churn goes on until the root is ready (or
    // failed), so the copy walks the churning directory whenever it gets there.
    let body =
        json!({"language": "python3", "code": "print(1)", "preload": "", "enable_network": false});
    let first = s.run_json(body.clone()).await.1;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    churn.join().unwrap();
    let later = s.run_json(body).await.1;
    assert_eq!(first["data"]["stdout"], "1\n", "{first}");
    assert_eq!(later["data"]["stdout"], "1\n", "{later}");
}

fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            found.extend(files_under(&e.path()));
        } else if t.is_file() {
            found.push(e.path());
        }
    }
    found
}

/// A request dropped mid-run (the client hangs up) leaves nothing of the run on the
/// host's disk: its private directory goes with its cgroup.
#[tokio::test]
async fn a_run_dropped_by_its_client_leaves_no_files() {
    use tokio::io::AsyncWriteExt;
    let (s, state) = chroot_server(&[("WARM_WORKERS", "0")]).await;
    // Warm the root so the run starts at once.
    assert_eq!(s.python("print(1)").await["stdout"], "1\n");
    let code = "import os, time\nd = '/tmp/run-%d' % os.getuid()\n\
                open(d + '/left-behind', 'wb').write(b'x' * (8 << 20))\ntime.sleep(4)";
    let body = json!({"language": "python3", "code": code, "enable_network": false}).to_string();
    for _ in 0..2 {
        let mut c = tokio::net::TcpStream::connect(s.addr())
            .await
            .expect("connect");
        let head = common::raw::run_head("application/json", body.len());
        c.write_all(head.as_bytes()).await.expect("head");
        c.write_all(body.as_bytes()).await.expect("body");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        drop(c);
    }
    // Longer than the runs would have lived.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let left: Vec<PathBuf> = files_under(&state.path().join("root-python3/tmp"))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "left-behind"))
        .collect();
    assert!(
        left.is_empty(),
        "runs whose clients hung up left their files on the host: {left:?}"
    );
}
