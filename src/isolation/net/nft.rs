//! Running `nft` and owning tables: one table per server process and purpose, named
//! `<prefix><pid namespace inode>_<pid>`, deleted when the server stops; a table left by
//! a server that died is deleted at the next start. The pid namespace is part of the
//! name so a server never takes the table of a live server whose pids it cannot see (a
//! container sharing the host's network).

use std::io::Write;
use std::process::{Command, Stdio};

#[derive(Debug, Clone, thiserror::Error)]
pub enum NftError {
    #[error("the `nft` command cannot run ({0}): install nftables (apt-get install nftables)")]
    Missing(String),
    #[error(
        "nft refused the rules: {0}. The server needs root with CAP_NET_ADMIN (in Docker: --cap-add NET_ADMIN) and a kernel with nf_tables"
    )]
    Refused(String),
}

/// An installed table; dropping it deletes the table.
#[derive(Debug)]
pub struct Table {
    name: String,
}

impl Table {
    /// The name this process's table of `prefix` has.
    pub fn name_for(prefix: &str) -> String {
        format!("{}{}", own_prefix(prefix), std::process::id())
    }

    /// Load `script`, which defines the table `name` (replacing one of that name).
    pub fn install(name: String, script: &str) -> Result<Self, NftError> {
        let _ = nft(&["delete", "table", "inet", &name], None);
        nft(&["-f", "-"], Some(script))?;
        Ok(Self { name })
    }

    /// Whether the kernel would accept `script`, checked without committing anything
    /// (`nft --check`): nothing is installed.
    pub fn check(script: &str) -> Result<(), NftError> {
        nft(&["--check", "-f", "-"], Some(script)).map(|_| ())
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        if let Err(e) = nft(&["delete", "table", "inet", &self.name], None) {
            tracing::warn!(table = %self.name, error = %e, "cannot delete an nftables table; delete it with `nft delete table inet {}`", self.name);
        }
    }
}

/// Delete tables of `prefix` whose server process is gone (killed before it could
/// delete its own); returns their names.
pub fn remove_stale(prefix: &str) -> Vec<String> {
    let Ok(list) = nft(&["list", "tables", "inet"], None) else {
        return Vec::new();
    };
    let ours = own_prefix(prefix);
    let mut removed = Vec::new();
    for name in list.split_whitespace().filter(|w| w.starts_with(&ours)) {
        if !pid_alive(&name[ours.len()..]) && nft(&["delete", "table", "inet", name], None).is_ok()
        {
            removed.push(name.to_string());
        }
    }
    removed
}

/// Whether another live server in this pid namespace holds a table of `prefix`.
pub fn others_alive(prefix: &str) -> bool {
    let Ok(list) = nft(&["list", "tables", "inet"], None) else {
        return false;
    };
    let ours = own_prefix(prefix);
    let me = std::process::id().to_string();
    list.split_whitespace()
        .filter_map(|w| w.strip_prefix(&ours))
        .any(|pid| pid != me && pid_alive(pid))
}

fn pid_alive(pid: &str) -> bool {
    pid.parse::<u32>()
        .is_ok_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
}

/// `<prefix><pid namespace inode>_`: the tables of servers whose pids we can see.
pub fn own_prefix(prefix: &str) -> String {
    let ns = std::fs::metadata("/proc/self/ns/pid")
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap_or(0);
    format!("{prefix}{ns}_")
}

pub fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
    let spawn = |program: &str| {
        Command::new(program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    // Services often run with a PATH that lacks /usr/sbin.
    let mut child = spawn("nft")
        .or_else(|_| spawn("/usr/sbin/nft"))
        .map_err(|e| NftError::Missing(e.to_string()))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| NftError::Missing(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| NftError::Missing(e.to_string()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NftError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}
