//! What the host must do for runs' packets to be forwarded: IPv4 forwarding on, and no
//! other firewall dropping them on the way (Docker sets the iptables FORWARD policy to
//! DROP). Both are put back as they were when the server stops.

use std::process::Command;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

#[derive(Debug, Clone, thiserror::Error)]
pub enum ForwardingError {
    #[error(
        "IPv4 forwarding is off and cannot be switched on ({0}): set net.ipv4.ip_forward=1 (sysctl -w net.ipv4.ip_forward=1; in Compose: `sysctls: net.ipv4.ip_forward: 1`)"
    )]
    Off(String),
    #[error(
        "iptables drops forwarded packets (FORWARD policy DROP) and refused an exception for runs: {0}. Allow them with `iptables -I FORWARD -i sbx+ -j ACCEPT` and `iptables -I FORWARD -o sbx+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT`"
    )]
    Iptables(#[from] IptablesError),
}

/// An iptables command that did not do what it was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IptablesError {
    #[error("cannot run iptables: {0}")]
    Start(#[source] std::sync::Arc<std::io::Error>),
    #[error("{0}")]
    Refused(String),
}

/// Forwarding as the server arranged it; dropping it undoes what the server changed.
#[derive(Debug)]
pub struct Forwarding {
    /// IPv4 forwarding was off: the server switched it on.
    pub switched_on: bool,
    /// The iptables exceptions, tagged with this comment.
    iptables: Option<String>,
    /// Whether another live server still needs forwarding when this one stops.
    others_alive: fn() -> bool,
}

impl Forwarding {
    /// Switch IPv4 forwarding on if needed, and let runs' packets past an iptables
    /// FORWARD policy of DROP. `tag` names this server's rules (its table's name).
    pub fn prepare(tag: &str, others_alive: fn() -> bool) -> Result<Self, ForwardingError> {
        let was = std::fs::read_to_string(IP_FORWARD)
            .map_err(|e| ForwardingError::Off(format!("{IP_FORWARD}: {e}")))?;
        let switched_on = was.trim() == "0";
        if switched_on {
            std::fs::write(IP_FORWARD, "1")
                .map_err(|e| ForwardingError::Off(format!("{IP_FORWARD}: {e}")))?;
        }
        let mut forwarding = Self {
            switched_on,
            iptables: None,
            others_alive,
        };
        if iptables_drops_forwarded() {
            for rule in exceptions(tag) {
                let mut args = vec!["-I", "FORWARD", "1"];
                args.extend(rule.iter().copied());
                iptables(&args)?;
            }
            forwarding.iptables = Some(tag.to_string());
        }
        Ok(forwarding)
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        if let Some(tag) = self.iptables.take() {
            for rule in exceptions(&tag) {
                let mut args = vec!["-D", "FORWARD"];
                args.extend(rule.iter().copied());
                let _ = iptables(&args);
            }
        }
        if self.switched_on && !(self.others_alive)() {
            let _ = std::fs::write(IP_FORWARD, "0");
        }
    }
}

/// The two rules that let runs' traffic past iptables; the server's own table still
/// decides what they may reach.
fn exceptions(tag: &str) -> [Vec<&str>; 2] {
    [
        vec![
            "-i",
            "sbx+",
            "-m",
            "comment",
            "--comment",
            tag,
            "-j",
            "ACCEPT",
        ],
        vec![
            "-o",
            "sbx+",
            "-m",
            "conntrack",
            "--ctstate",
            "RELATED,ESTABLISHED",
            "-m",
            "comment",
            "--comment",
            tag,
            "-j",
            "ACCEPT",
        ],
    ]
}

/// Whether iptables drops forwarded packets (so a server adds exceptions for runs),
/// read without changing anything.
pub fn iptables_drops_forwarded() -> bool {
    iptables(&["-S", "FORWARD"]).is_ok_and(|rules| policy_drops(&rules))
}

fn policy_drops(rules: &str) -> bool {
    rules.lines().any(|l| l.trim() == "-P FORWARD DROP")
}

/// Delete iptables exceptions of servers (tags `<prefix>...<pid>`) that are gone.
pub fn remove_stale_exceptions(prefix: &str, alive: impl Fn(&str) -> bool) {
    let Ok(rules) = iptables(&["-S", "FORWARD"]) else {
        return;
    };
    for line in rules.lines() {
        let Some(spec) = line.strip_prefix("-A FORWARD ") else {
            continue;
        };
        let tag = spec
            .split_whitespace()
            .skip_while(|w| *w != "--comment")
            .nth(1)
            .map(|t| t.trim_matches('"'));
        if let Some(tag) = tag.filter(|t| t.starts_with(prefix) && !alive(t)) {
            let mut args = vec!["-D", "FORWARD"];
            args.extend(spec.split_whitespace().map(|w| w.trim_matches('"')));
            if iptables(&args).is_ok() {
                tracing::info!(
                    tag,
                    "removed an iptables exception of a server that is gone"
                );
            }
        }
    }
}

fn iptables(args: &[&str]) -> Result<String, IptablesError> {
    // -w: wait for the xtables lock rather than fail while Docker holds it.
    let run = |program: &str| Command::new(program).arg("-w").arg("5").args(args).output();
    let out = run("iptables")
        .or_else(|_| run("/usr/sbin/iptables"))
        .map_err(|e| IptablesError::Start(std::sync::Arc::new(e)))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(IptablesError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_dropping_policy_needs_exceptions() {
        assert!(policy_drops("-P FORWARD DROP\n-A FORWARD -j DOCKER-USER\n"));
        assert!(!policy_drops("-P FORWARD ACCEPT\n"));
    }

    #[test]
    fn exceptions_are_tagged_for_removal() {
        for rule in exceptions("sandbox_net_1_2") {
            assert!(
                rule.windows(2)
                    .any(|w| w == ["--comment", "sandbox_net_1_2"])
            );
            assert!(rule.contains(&"sbx+"));
        }
    }
}
