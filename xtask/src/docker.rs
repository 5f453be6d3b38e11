//! Finding a Docker engine the way a developer's machine is usually set up.
//!
//! The Docker CLI only looks at `DOCKER_HOST` and the current context. On a Mac
//! the engine can also come from colima, OrbStack or Rancher Desktop, whose
//! sockets live in the user's home, so we try those as well and, when nothing
//! answers, explain every attempt instead of a bare "connection refused".

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::{API_DEFAULT_VERSION, Docker};
use sha2::{Digest, Sha256};

/// Long enough for a cold `cargo build` streamed over one request; bollard
/// applies it to the time until response headers arrive, not to the stream.
const REQUEST_TIMEOUT_SECS: u64 = 3600;
/// A healthy local engine answers a ping in milliseconds; a VM that is still
/// booting should not make the user wait long before the next candidate.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything discovery reads from the outside world, so tests can pass a
/// temporary HOME and their own environment instead of the process's.
#[derive(Debug, Clone)]
pub struct Discovery {
    pub env: BTreeMap<String, String>,
    pub home: Option<PathBuf>,
    /// Sockets outside the home directory (normally `/var/run/docker.sock`).
    pub system_sockets: Vec<PathBuf>,
}

/// One place an engine might be listening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Where the address came from, shown to the user.
    pub origin: String,
    /// `unix:///path`, `tcp://host:port`, ... or empty when the origin could
    /// not be resolved (then `problem` says why).
    pub host: String,
    /// Set when the candidate is known to be unusable before trying it.
    pub problem: Option<String>,
}

/// A candidate and why it did not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub candidate: Candidate,
    pub reason: String,
}

/// The engine that answered.
#[derive(Debug)]
pub struct Connected {
    pub docker: Docker,
    pub candidate: Candidate,
    /// Candidates tried before it, with the reason each failed.
    pub skipped: Vec<Attempt>,
}

/// No candidate answered a ping.
#[derive(Debug, thiserror::Error)]
pub struct NoEngine {
    pub attempts: Vec<Attempt>,
}

impl fmt::Display for NoEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "no Docker engine answered. Tried, in this order:")?;
        if self.attempts.is_empty() {
            writeln!(f, "  (nothing: DOCKER_HOST is unset and HOME is unknown)")?;
        }
        for (i, a) in self.attempts.iter().enumerate() {
            let host = if a.candidate.host.is_empty() {
                String::new()
            } else {
                format!(" {}", a.candidate.host)
            };
            writeln!(
                f,
                "  {}. {}{}: {}",
                i + 1,
                a.candidate.origin,
                host,
                a.reason
            )?;
        }
        write!(
            f,
            "Start a Docker engine, wait until it is ready, then run the command again:\n\
             \x20 - Docker Desktop:  open -a Docker\n\
             \x20 - colima:          colima start --cpu 4 --memory 8\n\
             \x20 - OrbStack:        orb start\n\
             \x20 - Rancher Desktop: start the app with the \"dockerd (moby)\" container engine\n\
             \x20 - Linux:           sudo systemctl start docker   (or: sudo dockerd &)\n\
             Or point DOCKER_HOST at a running engine, e.g. DOCKER_HOST=unix://$HOME/.colima/default/docker.sock"
        )
    }
}

impl Discovery {
    /// The real process environment and the usual system socket.
    pub fn from_process() -> Self {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        let home = env.get("HOME").filter(|h| !h.is_empty()).map(PathBuf::from);
        Discovery {
            env,
            home,
            system_sockets: vec![PathBuf::from("/var/run/docker.sock")],
        }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.env
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// The Docker CLI's config directory: `$DOCKER_CONFIG` or `~/.docker`.
    fn docker_config_dir(&self) -> Option<PathBuf> {
        match self.var("DOCKER_CONFIG") {
            Some(dir) => Some(PathBuf::from(dir)),
            None => self.home.as_ref().map(|h| h.join(".docker")),
        }
    }

    /// Candidates in the order they are tried, duplicates removed.
    pub fn candidates(&self) -> Vec<Candidate> {
        let mut out: Vec<Candidate> = Vec::new();

        if let Some(host) = self.var("DOCKER_HOST") {
            out.push(Candidate {
                origin: "DOCKER_HOST".into(),
                host: host.to_string(),
                problem: None,
            });
        }

        // DOCKER_CONTEXT wins over the config file, as in the Docker CLI.
        let context = match self.var("DOCKER_CONTEXT") {
            Some(name) => Some((name.to_string(), "DOCKER_CONTEXT".to_string())),
            None => self.current_context(),
        };
        if let Some((name, from)) = context {
            // "default" means "DOCKER_HOST or the system socket", both tried anyway.
            if name != "default" {
                out.push(self.context_candidate(&name, &from));
            }
        }

        if let Some(home) = &self.home {
            let known = [
                ("Docker Desktop", ".docker/run/docker.sock"),
                ("colima", ".colima/default/docker.sock"),
                ("colima (older versions)", ".colima/docker.sock"),
                ("OrbStack", ".orbstack/run/docker.sock"),
                ("Rancher Desktop", ".rd/docker.sock"),
            ];
            for (origin, rel) in known {
                out.push(socket_candidate(origin, &home.join(rel)));
            }
        }
        if let Some(dir) = self.var("XDG_RUNTIME_DIR") {
            out.push(socket_candidate(
                "rootless Docker",
                &Path::new(dir).join("docker.sock"),
            ));
        }
        for sock in &self.system_sockets {
            out.push(socket_candidate("system engine", sock));
        }

        let mut seen = std::collections::HashSet::new();
        out.retain(|c| c.host.is_empty() || seen.insert(c.host.clone()));
        out
    }

    /// `currentContext` from the CLI config, with a description of where it came from.
    fn current_context(&self) -> Option<(String, String)> {
        let path = self.docker_config_dir()?.join("config.json");
        let text = std::fs::read_to_string(&path).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        let name = json.get("currentContext")?.as_str()?.trim();
        if name.is_empty() {
            return None;
        }
        Some((
            name.to_string(),
            format!("currentContext in {}", path.display()),
        ))
    }

    /// The docker endpoint of a named context, read from the context store
    /// (`contexts/meta/<sha256 of the name>/meta.json`).
    fn context_candidate(&self, name: &str, from: &str) -> Candidate {
        let origin = format!("context \"{name}\" ({from})");
        let Some(config_dir) = self.docker_config_dir() else {
            return Candidate {
                origin,
                host: String::new(),
                problem: Some("HOME is not set, so the context store cannot be found".into()),
            };
        };
        let digest = hex(&Sha256::digest(name.as_bytes()));
        let meta = config_dir
            .join("contexts")
            .join("meta")
            .join(digest)
            .join("meta.json");
        let parsed = std::fs::read_to_string(&meta)
            .map_err(|e| format!("cannot read {}: {e}", meta.display()))
            .and_then(|text| {
                serde_json::from_str::<serde_json::Value>(&text)
                    .map_err(|e| format!("{} is not valid JSON: {e}", meta.display()))
            });
        let value = match parsed {
            Ok(v) => v,
            Err(problem) => {
                return Candidate {
                    origin,
                    host: String::new(),
                    problem: Some(problem),
                };
            }
        };
        let host = value
            .pointer("/Endpoints/docker/Host")
            .and_then(|h| h.as_str())
            .unwrap_or("")
            .to_string();
        let problem = host
            .is_empty()
            .then(|| format!("{} has no Endpoints.docker.Host", meta.display()));
        Candidate {
            origin,
            host,
            problem,
        }
    }

    /// Tries every candidate in order and returns the first engine that
    /// answers, with its API version negotiated down to what it supports.
    pub async fn connect(&self) -> Result<Connected, NoEngine> {
        let tls = self.var("DOCKER_TLS_VERIFY").is_some_and(|v| v != "0");
        let mut attempts = Vec::new();
        for candidate in self.candidates() {
            if let Some(problem) = &candidate.problem {
                attempts.push(Attempt {
                    reason: problem.clone(),
                    candidate,
                });
                continue;
            }
            match probe(&candidate.host, tls).await {
                Ok(docker) => {
                    return Ok(Connected {
                        docker,
                        candidate,
                        skipped: attempts,
                    });
                }
                Err(reason) => attempts.push(Attempt { candidate, reason }),
            }
        }
        Err(NoEngine { attempts })
    }
}

fn socket_candidate(origin: &str, path: &Path) -> Candidate {
    Candidate {
        origin: origin.to_string(),
        host: format!("unix://{}", path.display()),
        problem: None,
    }
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Connects to one address and pings it. The error is a short reason meant
/// for the list in [`NoEngine`].
async fn probe(host: &str, tls: bool) -> Result<Docker, String> {
    let docker = if let Some(path) = host.strip_prefix("unix://") {
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "no socket at this path".to_string(),
            _ => format!("cannot access the socket: {e}"),
        })?;
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            return Err("the path exists but is not a socket".into());
        }
        Docker::connect_with_unix(path, REQUEST_TIMEOUT_SECS, API_DEFAULT_VERSION)
            .map_err(|e| e.to_string())?
    } else if host.starts_with("tcp://") || host.starts_with("http://") {
        if tls {
            return Err(
                "DOCKER_TLS_VERIFY is set but TLS endpoints are not supported here; \
                 reach the engine through a unix socket or an SSH tunnel instead"
                    .into(),
            );
        }
        Docker::connect_with_http(host, REQUEST_TIMEOUT_SECS, API_DEFAULT_VERSION)
            .map_err(|e| e.to_string())?
    } else if host.starts_with("ssh://") {
        return Err("ssh:// hosts are not supported; forward the socket with \
             `ssh -nNT -L /tmp/docker.sock:/var/run/docker.sock HOST` and set \
             DOCKER_HOST=unix:///tmp/docker.sock"
            .into());
    } else {
        return Err("unsupported address scheme (expected unix:// or tcp://)".into());
    };

    match tokio::time::timeout(PING_TIMEOUT, docker.ping()).await {
        Err(_) => {
            return Err(format!(
                "no answer within {}s (is the engine still starting?)",
                PING_TIMEOUT.as_secs()
            ));
        }
        Ok(Err(e)) => return Err(describe_ping_error(&e, host.starts_with("unix://"))),
        Ok(Ok(_)) => {}
    }
    docker
        .negotiate_version()
        .await
        .map_err(|e| format!("answered a ping but not /version: {e}"))
}

fn describe_ping_error(e: &bollard::errors::Error, unix: bool) -> String {
    let text = e.to_string();
    let chain = {
        let mut s = text.clone();
        let mut src = std::error::Error::source(e);
        while let Some(inner) = src {
            s.push_str(": ");
            s.push_str(&inner.to_string());
            src = inner.source();
        }
        s
    };
    let lower = chain.to_lowercase();
    if lower.contains("permission denied") {
        "permission denied: add your user to the `docker` group (then log in again) or run with sudo"
            .into()
    } else if lower.contains("connection refused") && unix {
        "connection refused (the socket is left over; the engine is not running)".into()
    } else if lower.contains("connection refused") {
        "connection refused (nothing listens there)".into()
    } else {
        chain
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn discovery(home: &Path, env: &[(&str, &str)], system: Vec<PathBuf>) -> Discovery {
        Discovery {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            home: Some(home.to_path_buf()),
            system_sockets: system,
        }
    }

    fn write_context(config_dir: &Path, name: &str, host: &str) {
        let dir = config_dir
            .join("contexts/meta")
            .join(hex(&Sha256::digest(name.as_bytes())));
        fs::create_dir_all(&dir).unwrap();
        let meta = serde_json::json!({
            "Name": name,
            "Metadata": {},
            "Endpoints": {"docker": {"Host": host, "SkipTLSVerify": false}}
        });
        fs::write(dir.join("meta.json"), meta.to_string()).unwrap();
    }

    fn hosts(c: &[Candidate]) -> Vec<String> {
        c.iter().map(|c| c.host.clone()).collect()
    }

    #[test]
    fn order_without_any_configuration() {
        let home = tempfile::tempdir().unwrap();
        let h = home.path().display().to_string();
        let d = discovery(home.path(), &[], vec!["/var/run/docker.sock".into()]);
        assert_eq!(
            hosts(&d.candidates()),
            vec![
                format!("unix://{h}/.docker/run/docker.sock"),
                format!("unix://{h}/.colima/default/docker.sock"),
                format!("unix://{h}/.colima/docker.sock"),
                format!("unix://{h}/.orbstack/run/docker.sock"),
                format!("unix://{h}/.rd/docker.sock"),
                "unix:///var/run/docker.sock".to_string(),
            ]
        );
    }

    #[test]
    fn docker_host_then_current_context_then_sockets() {
        let home = tempfile::tempdir().unwrap();
        let cfg = home.path().join(".docker");
        fs::create_dir_all(&cfg).unwrap();
        fs::write(
            cfg.join("config.json"),
            r#"{"auths":{},"currentContext":"colima"}"#,
        )
        .unwrap();
        write_context(&cfg, "colima", "unix:///custom/colima.sock");
        let d = discovery(
            home.path(),
            &[("DOCKER_HOST", "tcp://10.0.0.5:2375")],
            vec![],
        );
        let c = d.candidates();
        assert_eq!(c[0].origin, "DOCKER_HOST");
        assert_eq!(c[0].host, "tcp://10.0.0.5:2375");
        assert!(
            c[1].origin
                .starts_with("context \"colima\" (currentContext in")
        );
        assert_eq!(c[1].host, "unix:///custom/colima.sock");
        assert_eq!(c[1].problem, None);
        assert!(c[2].host.ends_with("/.docker/run/docker.sock"));
    }

    #[test]
    fn docker_context_env_overrides_config_file() {
        let home = tempfile::tempdir().unwrap();
        let cfg = home.path().join(".docker");
        fs::create_dir_all(&cfg).unwrap();
        fs::write(cfg.join("config.json"), r#"{"currentContext":"colima"}"#).unwrap();
        write_context(&cfg, "colima", "unix:///colima.sock");
        write_context(&cfg, "orbstack", "unix:///orb.sock");
        let d = discovery(home.path(), &[("DOCKER_CONTEXT", "orbstack")], vec![]);
        let c = d.candidates();
        assert_eq!(c[0].origin, "context \"orbstack\" (DOCKER_CONTEXT)");
        assert_eq!(c[0].host, "unix:///orb.sock");
        assert!(!hosts(&c).contains(&"unix:///colima.sock".to_string()));
    }

    #[test]
    fn docker_config_env_moves_the_context_store() {
        let home = tempfile::tempdir().unwrap();
        let cfg = tempfile::tempdir().unwrap();
        fs::write(
            cfg.path().join("config.json"),
            r#"{"currentContext":"remote"}"#,
        )
        .unwrap();
        write_context(cfg.path(), "remote", "tcp://192.168.5.2:2375");
        let d = discovery(
            home.path(),
            &[("DOCKER_CONFIG", &cfg.path().display().to_string())],
            vec![],
        );
        assert_eq!(d.candidates()[0].host, "tcp://192.168.5.2:2375");
    }

    #[test]
    fn default_context_adds_nothing_and_duplicates_are_dropped() {
        let home = tempfile::tempdir().unwrap();
        let cfg = home.path().join(".docker");
        fs::create_dir_all(&cfg).unwrap();
        fs::write(cfg.join("config.json"), r#"{"currentContext":"default"}"#).unwrap();
        let sock = home.path().join(".colima/default/docker.sock");
        let d = discovery(
            home.path(),
            &[("DOCKER_HOST", &format!("unix://{}", sock.display()))],
            vec![],
        );
        let c = d.candidates();
        assert_eq!(c.len(), 5, "{c:#?}");
        assert_eq!(c[0].origin, "DOCKER_HOST");
        assert!(c.iter().all(|c| !c.origin.starts_with("context")));
        assert!(c.iter().all(|c| c.origin != "colima"));
    }

    #[test]
    fn missing_context_is_reported_not_skipped() {
        let home = tempfile::tempdir().unwrap();
        let d = discovery(home.path(), &[("DOCKER_CONTEXT", "gone")], vec![]);
        let c = d.candidates();
        assert_eq!(c[0].origin, "context \"gone\" (DOCKER_CONTEXT)");
        assert!(
            c[0].problem
                .as_deref()
                .is_some_and(|p| p.starts_with("cannot read ")),
            "{c:#?}"
        );
    }

    #[tokio::test]
    async fn message_when_no_engine_answers() {
        let home = tempfile::tempdir().unwrap();
        let h = home.path();
        // A socket file nobody listens on: what a crashed Docker Desktop leaves behind.
        let stale = h.join(".docker/run/docker.sock");
        fs::create_dir_all(stale.parent().unwrap()).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        // A plain file where a socket should be.
        let not_socket = h.join(".rd/docker.sock");
        fs::create_dir_all(not_socket.parent().unwrap()).unwrap();
        fs::write(&not_socket, "").unwrap();
        // A TCP port that refuses connections: bind, note the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = discovery(
            h,
            &[
                ("DOCKER_HOST", &format!("tcp://127.0.0.1:{port}")),
                ("DOCKER_CONTEXT", "colima"),
            ],
            vec![h.join("var-run-docker.sock")],
        );
        let err = d.connect().await.unwrap_err();
        let text = err.to_string();
        eprintln!("{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "no Docker engine answered. Tried, in this order:");
        assert!(
            lines[1].starts_with(&format!("  1. DOCKER_HOST tcp://127.0.0.1:{port}: ")),
            "{text}"
        );
        assert!(
            lines[2].starts_with("  2. context \"colima\" (DOCKER_CONTEXT): cannot read "),
            "{text}"
        );
        assert_eq!(
            lines[3],
            format!(
                "  3. Docker Desktop unix://{}: connection refused (the socket is left over; the engine is not running)",
                stale.display()
            )
        );
        assert_eq!(
            lines[4],
            format!(
                "  4. colima unix://{}/.colima/default/docker.sock: no socket at this path",
                h.display()
            )
        );
        assert!(lines[7].contains("Rancher Desktop") && lines[7].ends_with("not a socket"));
        assert!(lines[8].starts_with("  8. system engine unix://"), "{text}");
        assert!(text.contains("colima start"));
        assert!(text.contains("open -a Docker"));
        assert!(text.contains("DOCKER_HOST="));
        assert_eq!(err.attempts.len(), 8);
    }

    #[tokio::test]
    async fn tls_and_ssh_hosts_get_a_workaround() {
        let home = tempfile::tempdir().unwrap();
        let d = discovery(
            home.path(),
            &[
                ("DOCKER_HOST", "tcp://example.invalid:2376"),
                ("DOCKER_TLS_VERIFY", "1"),
            ],
            vec![],
        );
        let err = d.connect().await.unwrap_err();
        assert!(
            err.attempts[0]
                .reason
                .contains("TLS endpoints are not supported")
        );

        let d = discovery(home.path(), &[("DOCKER_HOST", "ssh://me@box")], vec![]);
        let err = d.connect().await.unwrap_err();
        assert!(err.attempts[0].reason.contains("ssh -nNT -L"));
    }
}
