//! `sandbox serve` in a default Docker container: no capability added, no privilege, so
//! the chroot level. It listens within 2 s of a trivial server started the same way, a
//! run sent at once waits for its root and works, a networked run is refused with the
//! fix named, and with the README's flag (`--cap-add NET_ADMIN`, or
//! `NETWORK_ISOLATION=shared` where no capability may be added) a networked run reaches
//! a stand-in for Dify's `ssrf_proxy` in another container on the same bridge.
//!
//! No image registry is assumed: the image is made from this host's Debian packages (the
//! production image's: Python 3 with requests, jinja2 and httpx, Node.js, libseccomp,
//! nftables, CA certificates), their dependencies and `/etc`, imported with
//! `docker import`, tagged by the packages' versions and reused while they do not change.
//! The server is this build's binary, bind-mounted read-only, with `conf/config.yaml`.
//!
//! Needs a Docker engine (CI: `install.sh --test` starts one); skipped, saying so, when
//! none answers or with `SANDBOX_SKIP_DOCKER_TESTS=1`. `SANDBOX_TEST_RUNTIME_IMAGE=<image>` uses that image instead of one made
//! from this host.

#![cfg(target_os = "linux")]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const KEY: &str = "dify-sandbox";
/// An HTTP server answering every GET with `peer-ok <path>`: the baseline (how soon a
/// trivial server answers in a container) and the stand-in proxy.
const ANSWER_EVERYTHING: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("peer-ok " + self.path).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;
/// The target: how much later than the trivial server `serve` may answer.
const START_BOUND: Duration = Duration::from_secs(2);

use common::runtime_image::{docker, runtime_image};

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A container removed (with what it wrote) when the test lets go of it.
struct Container {
    id: String,
    port: Option<u16>,
}

impl Container {
    fn start(image: &str, flags: &[&str], command: &[&str]) -> Self {
        let mut args = vec!["run", "-d", "-p", "127.0.0.1::8194"];
        args.extend_from_slice(flags);
        args.push(image);
        args.extend_from_slice(command);
        let id = docker_ok(&args);
        let mapped = docker_ok(&["port", &id, "8194/tcp"]);
        let port = mapped
            .lines()
            .next()
            .and_then(|l| l.rsplit(':').next())
            .and_then(|p| p.parse().ok());
        Self { id, port }
    }

    fn url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}{path}",
            self.port.expect("a published port")
        )
    }

    fn ip(&self) -> String {
        docker_ok(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", &self.id])
    }

    fn logs(&self) -> String {
        let out = docker(&["logs", &self.id]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", "-v", &self.id]);
    }
}

/// Time from `docker run` until `GET url` answers 200.
async fn started(
    client: &reqwest::Client,
    start: impl FnOnce() -> Container,
) -> (Container, Duration) {
    let begun = Instant::now();
    let container = start();
    let url = container.url("/health");
    loop {
        let answer = client
            .get(&url)
            .timeout(Duration::from_millis(500))
            .send()
            .await;
        if answer.is_ok_and(|a| a.status().is_success()) {
            return (container, begun.elapsed());
        }
        assert!(
            begun.elapsed() < Duration::from_secs(90),
            "no answer on {url} after 90 s; log:\n{}",
            container.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sandbox(image: &str, flags: &[&str]) -> Container {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let binary = format!(
        "{}:/usr/local/bin/sandbox:ro",
        env!("CARGO_BIN_EXE_sandbox")
    );
    let config = format!(
        "{}:/etc/sandbox/config.yaml:ro",
        root.join("conf/config.yaml").display()
    );
    let mut all = vec!["-v", &binary, "-v", &config, "-e", "LOG_FORMAT=json"];
    all.extend_from_slice(flags);
    Container::start(
        image,
        &all,
        &[
            "/usr/local/bin/sandbox",
            "serve",
            "--config",
            "/etc/sandbox/config.yaml",
        ],
    )
}

async fn run(client: &reqwest::Client, c: &Container, code: &str, network: bool) -> Value {
    client
        .post(c.url("/v1/sandbox/run"))
        .header("X-Api-Key", KEY)
        .json(&json!({
            "language": "python3",
            "code": code,
            "preload": "",
            "enable_network": network,
        }))
        .timeout(Duration::from_secs(90))
        .send()
        .await
        .expect("send a run")
        .json()
        .await
        .expect("a JSON answer")
}

/// Seconds from the server's first log line to "listening", from its JSON log.
fn own_start(log: &str) -> Option<f64> {
    let seconds = |line: &Value| -> Option<f64> {
        let t = line["timestamp"].as_str()?;
        // 2026-12-07T13:29:42.698990Z: the time of day is enough within one start.
        let clock = t.split('T').nth(1)?.trim_end_matches('Z');
        let mut parts = clock.split(':');
        let (h, m, s): (f64, f64, f64) = (
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
        );
        Some(h * 3600.0 + m * 60.0 + s)
    };
    let lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let first = seconds(lines.first()?)?;
    let listening = lines
        .iter()
        .find(|l| l["fields"]["message"] == "listening")?;
    Some(seconds(listening)? - first)
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_starts_fast_in_a_default_container_and_the_documented_flag_gives_runs_network() {
    if std::env::var("SANDBOX_SKIP_DOCKER_TESTS").as_deref() == Ok("1") {
        eprintln!("skipped: SANDBOX_SKIP_DOCKER_TESTS=1 (this test needs a Docker engine)");
        return;
    }
    if !docker(&["info"]).status.success() {
        eprintln!(
            "skipped: no Docker engine answers (`docker info` fails); start one with \
             .ci/start-dockerd.sh"
        );
        return;
    }
    let image = runtime_image();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();

    // The first container of a new image is slower: not the one measured.
    docker_ok(&["run", "--rm", &image, "true"]);
    // The baseline, same image and flags: a trivial server answering at once.
    let (baseline, trivial) = started(&client, || {
        Container::start(&image, &[], &["python3", "-c", ANSWER_EVERYTHING, "8194"])
    })
    .await;
    drop(baseline);

    // Docker's defaults: nothing added.
    let (server, took) = started(&client, || sandbox(&image, &[])).await;
    let log = server.logs();
    let own = own_start(&log);
    eprintln!(
        "default container: /health after {:.2} s (a trivial server: {:.2} s); the server's \
         own log, first line to listening: {own:?} s",
        took.as_secs_f64(),
        trivial.as_secs_f64()
    );
    assert!(
        log.contains("no namespaces on this host"),
        "not the chroot level:\n{log}"
    );
    assert!(
        took < trivial + START_BOUND,
        "serve answered {:.2} s after docker run, a trivial server {:.2} s; log:\n{log}",
        took.as_secs_f64(),
        trivial.as_secs_f64()
    );
    assert!(
        own.is_some_and(|s| s < START_BOUND.as_secs_f64()),
        "first log line to listening: {own:?} s; log:\n{log}"
    );
    // Sent at once, while the roots are still being copied: it waits for them.
    let begun = Instant::now();
    let offline = run(&client, &server, "print(6 * 7)", false).await;
    assert_eq!(offline["data"]["stdout"], "42\n", "{offline}");
    eprintln!(
        "first run answered {:.2} s after listening",
        begun.elapsed().as_secs_f64()
    );
    let refused = run(&client, &server, "print(1)", true).await;
    assert_eq!(refused["code"], -500, "{refused}");
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("network_isolation: shared"),
        "the refusal names no way out: {refused}"
    );
    drop(server);

    // A stand-in for Dify's ssrf_proxy: every networked code node goes through it.
    let proxy = Container::start(&image, &[], &["python3", "-c", ANSWER_EVERYTHING, "3128"]);
    let proxy_url = format!("http://{}:3128", proxy.ip());
    let http_proxy = format!("HTTP_PROXY={proxy_url}");
    let through_proxy = "import requests\nprint(requests.get('http://dify-sandbox-test.invalid/ping', timeout=10).text)";
    for (flags, level) in [
        (["--cap-add", "NET_ADMIN"], "sandbox uids filtered by table"),
        (
            ["-e", "NETWORK_ISOLATION=shared"],
            "NETWORKED RUNS SHARE THIS HOST'S NETWORK",
        ),
    ] {
        let mut all = flags.to_vec();
        all.extend_from_slice(&["-e", &http_proxy]);
        let (server, took) = started(&client, || sandbox(&image, &all)).await;
        let answer = run(&client, &server, through_proxy, true).await;
        let log = server.logs();
        eprintln!(
            "{}: /health after {:.2} s; networked run: {answer}",
            flags.join(" "),
            took.as_secs_f64()
        );
        assert!(log.contains(level), "{flags:?}: network level:\n{log}");
        assert_eq!(answer["code"], 0, "{flags:?}: {answer}\n{log}");
        assert_eq!(
            answer["data"]["stdout"], "peer-ok http://dify-sandbox-test.invalid/ping\n",
            "{flags:?}: {answer}"
        );
    }
}
