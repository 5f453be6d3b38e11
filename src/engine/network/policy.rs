//! What networked runs may get on this server: decided once, from the configuration and
//! the host's level, with no side effect. Setting it up may fail (a table the kernel
//! refuses, a subnet a route already uses); the policy is then narrowed by `isolation_failed`
//! or `guard_failed`, also pure. Every question about a run's network is put to the
//! resulting value: whether a request is admitted, what its sandbox gets, whether warm
//! networked workers are kept, what `sandbox doctor` and the start-up log say.
//!
//! It fails closed: a networked run gets its own network namespace behind the server's
//! rules, or the uid guard where namespaces cannot be made, or the host's network
//! because the operator asked for it; when none of that can be had, networked runs are
//! refused with the reason and its fix.

use crate::config::NetworkIsolation;
use crate::engine::RunError;
use crate::isolation::spec::{IsolationLevel, NetworkSetup};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkPolicy {
    /// `enable_network` is false: no run has network.
    Off,
    /// A network namespace of its own per run.
    Isolated,
    /// The host's network namespace.
    Shared {
        /// Behind the uid guard (an nftables table on the output hook).
        guarded: bool,
        /// The operator asked for it (`network_isolation: shared`); otherwise it is the
        /// chroot level's only way.
        requested: bool,
    },
    /// Networked runs are refused: why, and what to do.
    Refused(String),
}

impl NetworkPolicy {
    /// The decision, before anything is installed.
    pub fn decide(
        enable_network: bool,
        isolation: NetworkIsolation,
        level: IsolationLevel,
    ) -> Self {
        if !enable_network {
            return Self::Off;
        }
        // Tables need root (CAP_NET_ADMIN in the host's network namespace).
        let root = level != IsolationLevel::Rootless;
        match (isolation, level) {
            (NetworkIsolation::Shared, _) => Self::Shared {
                guarded: root,
                requested: true,
            },
            (NetworkIsolation::Auto, IsolationLevel::Namespaces) => Self::Isolated,
            (NetworkIsolation::Auto, IsolationLevel::Chroot) => Self::Shared {
                guarded: true,
                requested: false,
            },
            (NetworkIsolation::Auto, IsolationLevel::Rootless) => Self::Refused(
                "without root, runs cannot get a network of their own here; run the server as root, or set network_isolation: shared (NETWORK_ISOLATION=shared) to let runs use this user's network, loopback included".into(),
            ),
        }
    }

    /// What is left when runs' own namespaces cannot be set up (`reason`).
    pub fn isolation_failed(self, reason: &str) -> Self {
        match self {
            Self::Isolated => Self::Refused(format!(
                "networked runs cannot get a network of their own: {reason}"
            )),
            other => other,
        }
    }

    /// What is left when the uid guard cannot be installed: the host's network unguarded
    /// only where the operator asked for the host's network.
    pub fn guard_failed(self) -> Self {
        match self {
            Self::Shared {
                guarded: true,
                requested: true,
            } => Self::Shared {
                guarded: false,
                requested: true,
            },
            Self::Shared {
                guarded: true,
                requested: false,
            } => Self::Refused(
                "the chroot level shares the host's network and its guard (an nftables table) could not be installed (see the log): give the server CAP_NET_ADMIN (in Docker: --cap-add NET_ADMIN), or set network_isolation: shared (NETWORK_ISOLATION=shared) to let runs use the host's network unguarded".into(),
            ),
            other => other,
        }
    }

    /// What a run gets: `Offline` when it asks for no network, else its network, or
    /// the reason it is refused.
    pub fn grant(&self, networked: bool) -> Result<NetworkSetup, RunError> {
        if !networked {
            return Ok(NetworkSetup::Offline);
        }
        match self {
            Self::Off => Err(RunError::NetworkDisabled),
            Self::Refused(reason) => Err(RunError::NetworkUnavailable(reason.clone())),
            Self::Isolated => Ok(NetworkSetup::Own),
            Self::Shared { .. } => Ok(NetworkSetup::Host),
        }
    }

    /// Whether networked runs are served at all.
    pub fn serves_networked(&self) -> bool {
        self.grant(true).is_ok()
    }

    /// The level in words, for logs and `doctor` (the server adds the names of what it
    /// installed).
    pub fn describe(&self) -> String {
        match self {
            Self::Off => "none: enable_network is false".into(),
            Self::Isolated => "isolated: a network namespace per run (kept for the next run only when nothing was sent or left in it), NAT through the host".into(),
            Self::Shared {
                guarded: true,
                requested,
            } => format!(
                "shared{}: the host's network behind the uid guard",
                if *requested {
                    " by request"
                } else {
                    " (chroot level)"
                },
            ),
            Self::Shared { guarded: false, .. } => {
                "shared by request, unguarded: runs reach whatever this host reaches, its loopback included".into()
            }
            Self::Refused(reason) => format!("none: {reason}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use IsolationLevel::{Chroot, Namespaces, Rootless};
    use NetworkIsolation::{Auto, Shared};

    /// What a networked run gets, as the test names it.
    fn got(p: &NetworkPolicy) -> &'static str {
        match p.grant(true) {
            Ok(NetworkSetup::Own) => "own",
            Ok(NetworkSetup::Host) => match p {
                NetworkPolicy::Shared { guarded: true, .. } => "host, guarded",
                _ => "host, unguarded",
            },
            Ok(NetworkSetup::Offline) => "offline",
            Err(RunError::NetworkDisabled) => "disabled",
            Err(RunError::NetworkUnavailable(_)) => "refused",
            Err(e) => panic!("unexpected refusal: {e}"),
        }
    }

    /// Every level and configuration, and what setting it up may fail at: (enable,
    /// isolation, level) → as decided, when the namespaces cannot be made, when the
    /// guard cannot be installed.
    #[test]
    fn each_level_and_configuration() {
        #[rustfmt::skip]
        let table = [
            (false, Auto,   Namespaces, "disabled",       "disabled",       "disabled"),
            (false, Shared, Namespaces, "disabled",       "disabled",       "disabled"),
            (false, Auto,   Chroot,     "disabled",       "disabled",       "disabled"),
            (false, Auto,   Rootless,   "disabled",       "disabled",       "disabled"),
            (true,  Auto,   Namespaces, "own",            "refused",        "own"),
            (true,  Auto,   Chroot,     "host, guarded",  "host, guarded",  "refused"),
            (true,  Auto,   Rootless,   "refused",        "refused",        "refused"),
            (true,  Shared, Namespaces, "host, guarded",  "host, guarded",  "host, unguarded"),
            (true,  Shared, Chroot,     "host, guarded",  "host, guarded",  "host, unguarded"),
            (true,  Shared, Rootless,   "host, unguarded", "host, unguarded", "host, unguarded"),
        ];
        for (enable, isolation, level, decided, no_netns, no_guard) in table {
            let p = NetworkPolicy::decide(enable, isolation, level);
            let case = format!("enable_network {enable}, {isolation:?}, {level:?}");
            assert_eq!(got(&p), decided, "{case}");
            assert_eq!(
                got(&p.clone().isolation_failed("no nft")),
                no_netns,
                "{case}, namespaces impossible"
            );
            assert_eq!(got(&p.clone().guard_failed()), no_guard, "{case}, no guard");
            // Offline runs are never refused, whatever the policy.
            assert_eq!(p.grant(false).ok(), Some(NetworkSetup::Offline), "{case}");
            assert_eq!(p.serves_networked(), p.grant(true).is_ok(), "{case}");
        }
    }

    #[test]
    fn a_refusal_says_why_and_what_to_do() {
        let rootless = NetworkPolicy::decide(true, Auto, Rootless);
        let chroot = NetworkPolicy::decide(true, Auto, Chroot).guard_failed();
        let no_netns = NetworkPolicy::decide(true, Auto, Namespaces)
            .isolation_failed("network_subnet overlaps a route");
        for p in [&rootless, &chroot] {
            let Err(RunError::NetworkUnavailable(reason)) = p.grant(true) else {
                panic!("not refused: {p:?}");
            };
            assert!(reason.contains("network_isolation: shared"), "{reason}");
        }
        assert!(
            no_netns
                .describe()
                .ends_with("network of their own: network_subnet overlaps a route"),
            "{}",
            no_netns.describe()
        );
    }

    #[test]
    fn the_words_name_the_level() {
        for (p, start) in [
            (NetworkPolicy::decide(false, Auto, Namespaces), "none"),
            (NetworkPolicy::decide(true, Auto, Namespaces), "isolated"),
            (
                NetworkPolicy::decide(true, Auto, Chroot),
                "shared (chroot level)",
            ),
            (
                NetworkPolicy::decide(true, Shared, Namespaces),
                "shared by request",
            ),
            (
                NetworkPolicy::decide(true, Shared, Rootless),
                "shared by request, unguarded",
            ),
            (
                NetworkPolicy::decide(true, Auto, Rootless),
                "none: without root",
            ),
        ] {
            assert!(p.describe().starts_with(start), "{p:?}: {}", p.describe());
        }
    }
}
