//! The listening port and the Docker engine, probed with a minimal HTTP request.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::packages::{Need, PackageManager};
use super::{Check, Status, check, ok};

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

pub(super) fn port_check(port: u16) -> Check {
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

/// Why an engine's endpoint did not answer.
#[derive(Debug, thiserror::Error)]
enum Unreachable {
    #[error("cannot resolve {0}")]
    Unresolved(String),
    #[error("{at}: {source}")]
    Connect {
        at: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} did not answer /_ping")]
    NoPing(String),
    #[error("{0} did not answer /_ping (TLS endpoints are not checked)")]
    NoPingTcp(String),
    #[error("{0}: only unix:// and tcp:// are checked")]
    Scheme(String),
}

/// Connect to `hostport`, reads and writes bounded by `PROBE_TIMEOUT`.
fn connect_tcp(hostport: &str) -> Result<TcpStream, Unreachable> {
    let addr = hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| Unreachable::Unresolved(hostport.into()))?;
    let s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).map_err(|source| {
        Unreachable::Connect {
            at: hostport.into(),
            source,
        }
    })?;
    let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
    let _ = s.set_write_timeout(Some(PROBE_TIMEOUT));
    Ok(s)
}

fn docker_ping(endpoint: &str) -> Result<(), Unreachable> {
    if let Some(path) = endpoint.strip_prefix("unix://") {
        let s = UnixStream::connect(path).map_err(|source| Unreachable::Connect {
            at: path.into(),
            source,
        })?;
        let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
        let _ = s.set_write_timeout(Some(PROBE_TIMEOUT));
        return if http_ok(s, "/_ping") {
            Ok(())
        } else {
            Err(Unreachable::NoPing(path.into()))
        };
    }
    if let Some(hostport) = endpoint.strip_prefix("tcp://") {
        let s = connect_tcp(hostport)?;
        return if http_ok(s, "/_ping") {
            Ok(())
        } else {
            Err(Unreachable::NoPingTcp(hostport.into()))
        };
    }
    Err(Unreachable::Scheme(endpoint.into()))
}

pub(super) fn docker_check(pm: PackageManager) -> Check {
    let mut errors = Vec::new();
    for endpoint in docker_endpoints() {
        match docker_ping(&endpoint) {
            Ok(()) => {
                return ok(
                    "docker",
                    format!("engine answers at {endpoint} (for the xtask)"),
                );
            }
            Err(e) => errors.push(e.to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_engine_says_where_and_why() {
        assert!(matches!(
            docker_ping("ssh://host"),
            Err(Unreachable::Scheme(e)) if e == "ssh://host"
        ));
        let e = docker_ping("unix:///nonexistent/docker.sock").unwrap_err();
        assert!(matches!(e, Unreachable::Connect { .. }), "{e}");
        assert!(
            e.to_string().starts_with("/nonexistent/docker.sock: "),
            "{e}"
        );
        // A port nothing listens on: bound, then closed. Tests running beside this one
        // may take the same port in between: then another one.
        let refused = (0..5).any(|_| {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            matches!(
                docker_ping(&format!("tcp://127.0.0.1:{port}")),
                Err(Unreachable::Connect { .. })
            )
        });
        assert!(refused, "a closed port is reported as a failed connection");
    }
}
