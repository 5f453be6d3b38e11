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

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const KEY: &str = "dify-sandbox";
/// Packages of the production image (docker/sandbox.Dockerfile), plus what every Debian
/// image has that the server uses: a shell, coreutils, `ldd` (libc-bin, a bash script).
const PACKAGES: &[&str] = &[
    "python3",
    "python3-requests",
    "python3-jinja2",
    "python3-httpx",
    "nodejs",
    "libseccomp2",
    "nftables",
    "ca-certificates",
    "dash",
    "coreutils",
    "libc-bin",
    "bash",
];
const SKIP_PREFIXES: &[&str] = &[
    "/usr/share/doc",
    "/usr/share/man",
    "/usr/share/info",
    "/usr/share/locale",
    "/usr/share/lintian",
];
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

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("run the docker CLI")
}

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

/// The image to run the server in: `SANDBOX_TEST_RUNTIME_IMAGE`, or one made from this
/// host's packages (made once per set of package versions).
fn runtime_image() -> String {
    if let Ok(image) = std::env::var("SANDBOX_TEST_RUNTIME_IMAGE")
        && !image.is_empty()
    {
        return image;
    }
    let closure = package_closure();
    let mut key = std::hash::DefaultHasher::new();
    closure.hash(&mut key);
    let image = format!("sandbox-test-runtime:{:016x}", key.finish());
    if docker(&["image", "inspect", &image]).status.success() {
        return image;
    }
    let names: Vec<&str> = closure.iter().filter_map(|p| p.split('=').next()).collect();
    let list = tempfile::NamedTempFile::new().unwrap();
    let mut paths = String::new();
    for p in rootfs_paths(&names) {
        paths.push_str(p.to_str().expect("UTF-8 paths"));
        paths.push('\n');
    }
    std::fs::write(list.path(), paths).unwrap();
    let started = Instant::now();
    let mut tar = Command::new("tar")
        .args(["--no-recursion", "-cf", "-", "-T"])
        .arg(list.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run tar");
    let import = Command::new("docker")
        .args([
            "import",
            "--change",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            "WORKDIR /app",
            "--change",
            "LABEL dev.sandbox.xtask=test-runtime",
            "-",
            &image,
        ])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .expect("run docker import");
    let _ = tar.wait();
    assert!(
        import.status.success(),
        "docker import: {}",
        String::from_utf8_lossy(&import.stderr)
    );
    eprintln!(
        "runtime image {image} made from this host in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    image
}

/// The installed packages the image needs with their dependencies, as `name=version`.
fn package_closure() -> Vec<String> {
    let out = Command::new("apt-cache")
        .args([
            "depends",
            "--recurse",
            "--installed",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
        ])
        .args(PACKAGES)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "apt-cache is needed to make the runtime image from this host ({e}); on a \
                 non-Debian host set SANDBOX_TEST_RUNTIME_IMAGE"
            )
        });
    let names: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('<') && !l.is_empty())
        .map(str::to_string)
        .collect();
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev} ${Package}=${Version}\n"])
        .args(&names)
        .output()
        .expect("run dpkg-query");
    let installed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("ii "))
        .map(|l| l.trim().to_string())
        .collect();
    for needed in ["python3=", "nodejs=", "nftables=", "python3-requests="] {
        assert!(
            installed.iter().any(|p| p.starts_with(needed)),
            "package {needed} is not installed here: apt-get install -y python3 \
             python3-requests python3-jinja2 python3-httpx nodejs libseccomp2 nftables \
             (or set SANDBOX_TEST_RUNTIME_IMAGE)"
        );
    }
    installed
}

/// Every path of the image, each after its parent directories: the top-level links of a
/// merged /usr, the packages' files resolved through them (with Python's compiled
/// `__pycache__`, as an installed image has it), and `/etc` without its secrets.
fn rootfs_paths(packages: &[&str]) -> Vec<PathBuf> {
    let out = Command::new("dpkg-query")
        .arg("-L")
        .args(packages)
        .output()
        .expect("dpkg-query -L");
    let mut files: BTreeSet<PathBuf> = BTreeSet::new();
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in listed.lines() {
        if !line.starts_with('/')
            || line.starts_with("/etc/")
            || SKIP_PREFIXES.iter().any(|p| line.starts_with(p))
        {
            continue;
        }
        let path = Path::new(line);
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            continue;
        };
        let Ok(parent) = parent.canonicalize() else {
            continue;
        };
        let real = parent.join(name);
        let Ok(meta) = std::fs::symlink_metadata(&real) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(cache) = std::fs::read_dir(real.join("__pycache__")) {
                files.extend(cache.flatten().map(|e| e.path()));
            }
        } else {
            files.insert(real);
        }
    }
    let secret = |p: &Path| {
        [
            "/etc/shadow",
            "/etc/gshadow",
            "/etc/ssh",
            "/etc/ssl/private",
        ]
        .iter()
        .any(|s| p.starts_with(s))
            || p.to_string_lossy().ends_with('-')
    };
    let mut etc = vec![PathBuf::from("/etc")];
    while let Some(dir) = etc.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if secret(&path) {
                continue;
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                etc.push(path);
            } else {
                files.insert(path);
            }
        }
    }
    let mut ordered: Vec<PathBuf> = ["/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"]
        .iter()
        .map(PathBuf::from)
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_symlink()))
        .collect();
    let mut seen: BTreeSet<PathBuf> = ordered.iter().cloned().collect();
    for dir in ["/tmp", "/root", "/app"] {
        if Path::new(dir).is_dir() {
            files.insert(PathBuf::from(dir));
        }
    }
    for file in files {
        let mut parents: Vec<PathBuf> = file
            .ancestors()
            .skip(1)
            .filter(|p| *p != Path::new("/"))
            .map(Path::to_path_buf)
            .collect();
        parents.reverse();
        for p in parents.into_iter().chain([file]) {
            if seen.insert(p.clone()) {
                ordered.push(p);
            }
        }
    }
    ordered
}
