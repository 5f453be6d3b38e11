//! Where an engine might listen: `DOCKER_HOST`, the Docker CLI's current
//! context, the sockets of the usual Mac engines, rootless Docker and the
//! system socket, in that order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::hex;

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

    pub(super) fn var(&self, name: &str) -> Option<&str> {
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
}

fn socket_candidate(origin: &str, path: &Path) -> Candidate {
    Candidate {
        origin: origin.to_string(),
        host: format!("unix://{}", path.display()),
        problem: None,
    }
}

#[cfg(test)]
impl Discovery {
    /// Sees only `home`, `env` and `system` sockets, never the process's own.
    pub(super) fn isolated(home: &Path, env: &[(&str, &str)], system: Vec<PathBuf>) -> Self {
        Discovery {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            home: Some(home.to_path_buf()),
            system_sockets: system,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

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
        let d = Discovery::isolated(home.path(), &[], vec!["/var/run/docker.sock".into()]);
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
        let d = Discovery::isolated(
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
        let d = Discovery::isolated(home.path(), &[("DOCKER_CONTEXT", "orbstack")], vec![]);
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
        let d = Discovery::isolated(
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
        let d = Discovery::isolated(
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
        let d = Discovery::isolated(home.path(), &[("DOCKER_CONTEXT", "gone")], vec![]);
        let c = d.candidates();
        assert_eq!(c[0].origin, "context \"gone\" (DOCKER_CONTEXT)");
        assert!(
            c[0].problem
                .as_deref()
                .is_some_and(|p| p.starts_with("cannot read ")),
            "{c:#?}"
        );
    }
}
