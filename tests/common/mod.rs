//! Shared helpers for the integration tests: a real `sandbox serve` on a free loopback
//! port, and a small client for its API. The tests run as root, for real; a file that
//! needs root says so with `common::needs_root!()`, and is skipped otherwise.
#![allow(dead_code)]

pub mod netlab;

use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub mod raw;
pub mod runtime_image;

pub const KEY: &str = "dify-sandbox";

/// Skips the test file it is written in, with one line saying why, when the tests do not
/// run as root: they set up real jails (namespaces, cgroups, seccomp, runs as other
/// uids), which only root may. CI runs them as root; `cargo test` as another user still
/// runs the unit tests and the files that need no root.
#[allow(unused_macros)]
macro_rules! needs_root {
    () => {
        // SAFETY: runs before main, on the only thread: it reads the effective uid, may
        // write one line and exit, and touches nothing the test harness uses.
        #[ctor::ctor(unsafe)]
        fn skip_unless_root() {
            $crate::common::skip_unless_root(file!());
        }
    };
}
#[allow(unused_imports)]
pub(crate) use needs_root;

/// Exit (successfully) with one line unless this process is root; see `needs_root!`.
pub fn skip_unless_root(file: &str) {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "skipping {file}: needs root (its tests set up real jails: namespaces, cgroups, seccomp, runs as other uids); run it as root, as CI does"
        );
        std::process::exit(0);
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sandbox")
}

/// A local address of this host other than loopback (which the network guard refuses
/// to networked runs): the source of the default route (connecting a UDP socket sends
/// nothing, it only picks the route), else any local address the kernel lists.
pub fn host_address() -> std::net::IpAddr {
    let routed = std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| {
        s.connect("192.0.2.1:9")?;
        s.local_addr()
    });
    if let Ok(addr) = routed {
        return addr.ip();
    }
    // /proc/net/fib_trie: "|-- 10.0.0.5" followed by "/32 host LOCAL" for each local address.
    let trie = std::fs::read_to_string("/proc/net/fib_trie").unwrap_or_default();
    let lines: Vec<&str> = trie.lines().collect();
    lines
        .windows(2)
        .filter(|w| w[1].contains("host LOCAL"))
        .filter_map(|w| w[0].trim().trim_start_matches("|--").trim().parse().ok())
        .find(|a: &std::net::IpAddr| !a.is_loopback())
        .expect("this test needs a network interface besides loopback")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

pub struct Server {
    child: Child,
    pub base: String,
    pub client: reqwest::Client,
}

impl Server {
    /// Start with the embedded defaults plus `env` overrides.
    pub async fn start(env: &[(&str, &str)]) -> Self {
        Self::start_with_stderr(env, Stdio::inherit(), None, None).await
    }

    /// As user `uid` (and its own group), with only PATH and `env` in its environment.
    pub async fn start_as(uid: u32, env: &[(&str, &str)]) -> Self {
        Self::start_with_stderr(env, Stdio::inherit(), Some(uid), None).await
    }

    /// Like `start`, with the server's log (stderr) written to `log`.
    pub async fn start_logging(env: &[(&str, &str)], log: &std::path::Path) -> Self {
        let file = std::fs::File::create(log).expect("log file");
        Self::start_with_stderr(env, Stdio::from(file), None, None).await
    }

    /// Like `start_logging`, started under the descriptor limit `soft`:`hard` (by
    /// util-linux `prlimit`, which sets it and executes the server in its place).
    pub async fn start_with_nofile(
        env: &[(&str, &str)],
        (soft, hard): (u64, u64),
        log: &std::path::Path,
    ) -> Self {
        let file = std::fs::File::create(log).expect("log file");
        Self::start_with_stderr(env, Stdio::from(file), None, Some((soft, hard))).await
    }

    /// Started by `prefix` (a command that ends by executing its arguments: the server
    /// binary, then `serve`), to give the server a world of its own.
    pub async fn start_under(prefix: &[&str], env: &[(&str, &str)]) -> Self {
        let prefix: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        Self::start_prefixed(env, Stdio::inherit(), None, Some(prefix)).await
    }

    async fn start_with_stderr(
        env: &[(&str, &str)],
        stderr: Stdio,
        user: Option<u32>,
        nofile: Option<(u64, u64)>,
    ) -> Self {
        let prefix = nofile
            .map(|(soft, hard)| vec!["prlimit".to_string(), format!("--nofile={soft}:{hard}")]);
        Self::start_prefixed(env, stderr, user, prefix).await
    }

    async fn start_prefixed(
        env: &[(&str, &str)],
        stderr: Stdio,
        user: Option<u32>,
        prefix: Option<Vec<String>>,
    ) -> Self {
        let port = free_port();
        let mut cmd = match prefix {
            Some(prefix) => {
                let mut c = Command::new(&prefix[0]);
                c.args(&prefix[1..]).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        if let Some(uid) = user {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid)
                .gid(uid)
                .env_clear()
                .env("PATH", "/usr/bin:/bin");
        }
        cmd.arg("serve")
            .current_dir(std::env::temp_dir())
            .env("SANDBOX_PORT", port.to_string())
            .env("SANDBOX_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start sandbox serve");
        let server = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
        };
        server.wait_healthy().await;
        server
    }

    async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(r) = self
                .client
                .get(format!("{}/health", self.base))
                .send()
                .await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("sandbox serve did not become healthy at {}", self.base);
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `127.0.0.1:port`, for tests that speak HTTP over a socket of their own.
    pub fn addr(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// POST /v1/sandbox/run with a JSON body; returns (HTTP status, body as JSON).
    pub async fn run_json(&self, body: Value) -> (u16, Value) {
        post(&self.client, format!("{}/v1/sandbox/run", self.base), body).await
    }

    /// POST `path` with a JSON body and the key; returns the answer as JSON.
    pub async fn post_json(&self, path: &str, body: Value) -> Value {
        post(&self.client, format!("{}{path}", self.base), body)
            .await
            .1
    }

    /// Start a run in the background (for tests that act while it executes).
    pub fn spawn_run(&self, body: Value) -> tokio::task::JoinHandle<Value> {
        let (client, url) = (self.client.clone(), format!("{}/v1/sandbox/run", self.base));
        tokio::spawn(async move { post(&client, url, body).await.1 })
    }

    /// Run code and return the envelope's `data`, asserting the envelope is a success.
    pub async fn run(&self, language: &str, code: &str) -> Value {
        let (status, body) = self
            .run_json(json!({"language": language, "code": code, "enable_network": false}))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["code"], 0, "{body}");
        body["data"].clone()
    }

    pub async fn python(&self, code: &str) -> Value {
        self.run("python3", code).await
    }

    /// A language's extra packages as the dependency endpoint lists them: (lower-case
    /// name, version).
    pub async fn listed(&self, language: &str) -> Vec<(String, String)> {
        let v: Value = self
            .client
            .get(format!(
                "{}/v1/sandbox/dependencies?language={language}",
                self.base
            ))
            .header("X-Api-Key", KEY)
            .send()
            .await
            .expect("dependencies")
            .json()
            .await
            .expect("dependencies JSON");
        assert_eq!(v["code"], 0, "{v}");
        v["data"]["dependencies"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|d| {
                (
                    d["name"].as_str().unwrap_or("").to_lowercase(),
                    d["version"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// A series of `/metrics` without labels (0 when absent).
    pub async fn metric(&self, name: &str) -> u64 {
        let text = reqwest::get(format!("{}/metrics", self.base))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Until the server has no clean-up in progress (a released run's namespace is kept
    /// or destroyed by then).
    pub async fn settled(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.metric("sandbox_background_tasks").await != 0 {
            assert!(Instant::now() < deadline, "clean-ups never end");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn healthy(&self) -> bool {
        match self
            .client
            .get(format!("{}/health", self.base))
            .send()
            .await
        {
            Ok(r) => r.status().is_success(),
            Err(_) => false,
        }
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = nix_kill(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    /// SIGTERM first, so the server removes what it set up on the host (its network
    /// table, runs' interfaces); SIGKILL when it has not stopped within ten seconds.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix_kill(self.child.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// POST `body` as JSON with the key; the answer as JSON (or as a JSON string if it is not).
async fn post(client: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let r = client
        .post(url)
        .header("X-Api-Key", KEY)
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub fn nix_kill(pid: u32, sig: &str) -> std::io::Result<Output> {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .output()
}

/// Per-run cgroup directories of the server `pid` (v1 memory and pids hierarchies or the
/// v2 tree, under this process's own cgroups, where the server creates them).
/// Whether, within `within`, no process runs as `uid` any more.
pub async fn no_process_of(uid: u32, within: Duration) -> bool {
    let uid = uid.to_string();
    let runs_as_uid = |status: String| {
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(&uid))
    };
    let deadline = Instant::now() + within;
    loop {
        let running = std::fs::read_dir("/proc").is_ok_and(|entries| {
            entries.flatten().any(|e| {
                runs_as_uid(std::fs::read_to_string(e.path().join("status")).unwrap_or_default())
            })
        });
        if !running {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn run_cgroups_of(pid: u32) -> Vec<std::path::PathBuf> {
    let prefix = format!("sandbox-run-{pid}-");
    let mut found = Vec::new();
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (
            parts.next(),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        let base = match controllers {
            "" => std::path::PathBuf::from("/sys/fs/cgroup"),
            c if c.split(',').any(|x| x == "memory" || x == "pids") => {
                std::path::Path::new("/sys/fs/cgroup").join(
                    c.split(',')
                        .find(|x| *x == "memory" || *x == "pids")
                        .unwrap_or(c),
                )
            }
            _ => continue,
        };
        let dir = base.join(path.trim_start_matches('/'));
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                found.push(entry.path());
            }
        }
    }
    found
}

/// Standard base64, as Dify encodes code-node inputs.
pub fn base64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Run `cmd` with `input` on its stdin, written by a thread of its own (the command may
/// stop reading early), and return its output.
pub fn feed(mut cmd: Command, input: &[u8]) -> Output {
    use std::io::Write;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start the command");
    let mut stdin = child.stdin.take().expect("its stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("wait for it");
    let _ = writer.join();
    out
}

/// `sandbox <args>` with `input` on its stdin and extra environment.
pub fn sandbox_with_stdin(args: &[&str], input: &[u8], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .current_dir(std::env::temp_dir())
        .envs(env.iter().copied());
    feed(cmd, input)
}

/// `sandbox <args>` with extra environment; returns the finished output.
pub fn sandbox(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args).current_dir(std::env::temp_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run sandbox")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
