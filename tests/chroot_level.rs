//! The degraded level (chroot + setuid + seccomp, no namespaces), forced on this host
//! with SANDBOX_ISOLATION=chroot: what an unprivileged container gets. The guarantees
//! that do not need namespaces must still hold.

mod common;

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
for d in os.listdir('/tmp'):
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
