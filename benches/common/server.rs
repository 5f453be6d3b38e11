//! A real `sandbox serve` on a free port, stopped with SIGTERM so that it removes its
//! cgroups and network guard table as in production.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const KEY: &str = "dify-sandbox";

pub struct Server {
    child: Child,
    pub port: u16,
    pub base: String,
}

impl Server {
    /// Start the release-built server (or the binary `SANDBOX_BENCH_BIN` names, to set two
    /// builds side by side) with `env` on top of the built-in defaults and wait until
    /// `/health` answers.
    pub async fn start(env: &[(&str, String)], client: &reqwest::Client) -> Self {
        let bin = std::env::var_os("SANDBOX_BENCH_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_sandbox").into());
        Self::start_bin(&bin, env, client).await
    }

    /// Start the binary `bin` as `start` does.
    pub async fn start_bin(
        bin: &std::ffi::OsStr,
        env: &[(&str, String)],
        client: &reqwest::Client,
    ) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut command = Command::new(bin);
        command
            .arg("serve")
            // No conf/config.yaml there: the built-in defaults plus `env`.
            .current_dir(std::env::temp_dir())
            .env("SANDBOX_PORT", port.to_string())
            .env("SANDBOX_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null());
        let base = format!("http://127.0.0.1:{port}");
        let child = command.spawn().expect("start sandbox serve");
        let server = Self { child, port, base };
        let since = Instant::now();
        while client
            .get(format!("{}/health", server.base))
            .send()
            .await
            .is_err()
        {
            assert!(
                since.elapsed() < Duration::from_secs(60),
                "sandbox serve did not answer /health within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the server ended, once it has (it is reaped then); None while it runs.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then wait for the drain; SIGKILL after `grace`. True when it exited by itself.
    pub fn stop(&mut self, grace: Duration) -> bool {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return true;
        }
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let since = Instant::now();
        while since.elapsed() < grace {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(20));
    }
}

/// One `POST /v1/sandbox/run`: the HTTP status and the envelope.
pub async fn run(
    client: &reqwest::Client,
    base: &str,
    body: &Value,
) -> Result<(u16, Value), String> {
    let r = client
        .post(format!("{base}/v1/sandbox/run"))
        .header("X-Api-Key", KEY)
        .json(body)
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = r.status().as_u16();
    let v = r
        .json()
        .await
        .map_err(|e| format!("HTTP {status}, body is not JSON: {e}"))?;
    Ok((status, v))
}

/// The interpreter the benchmark measures and its server runs: the distribution's
/// `/usr/bin/python3`, which operators deploy with, wherever it exists (a PATH may put a
/// slower self-built one first, which would flatter the ratios); else the real executable
/// behind `python3` on PATH (pyenv and the like put a shim script there).
pub fn resolve_python() -> String {
    const DISTRO_PYTHON: &str = "/usr/bin/python3";
    if std::path::Path::new(DISTRO_PYTHON).exists() {
        return DISTRO_PYTHON.to_string();
    }
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 on PATH");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An HTTP client for a benchmark with up to `clients` connections at once.
pub fn client(clients: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(clients)
        .build()
        .expect("build the HTTP client")
}
