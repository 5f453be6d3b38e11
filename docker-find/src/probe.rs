//! Trying the candidates in order: connect, ping, negotiate the API
//! version, and say in a few words why each one that failed did not answer.

use std::fmt;
use std::time::Duration;

use bollard::{API_DEFAULT_VERSION, Docker};

use crate::{Candidate, Discovery};

/// Long enough for a cold `cargo build` streamed over one request; bollard
/// applies it to the time until response headers arrive, not to the stream.
const REQUEST_TIMEOUT_SECS: u64 = 3600;
/// A healthy local engine answers a ping in milliseconds; a VM that is still
/// booting should not make the user wait long before the next candidate.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

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
        let d = Discovery::isolated(
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
        let d = Discovery::isolated(
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

        let d = Discovery::isolated(home.path(), &[("DOCKER_HOST", "ssh://me@box")], vec![]);
        let err = d.connect().await.unwrap_err();
        assert!(err.attempts[0].reason.contains("ssh -nNT -L"));
    }
}
