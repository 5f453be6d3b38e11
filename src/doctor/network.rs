//! The nftables guard that keeps networked runs away from denied addresses.

use crate::config::Config;

use super::packages::{Need, PackageManager};
use super::{Check, Status, check, ok};

/// Whether networked runs get the nftables guard: tried for real (a table created and
/// deleted).
pub(super) fn network_guard_check(config: &Config, root: bool, pm: PackageManager) -> Check {
    const NAME: &str = "network guard";
    if !config.enable_network {
        return ok(NAME, "enable_network is false: runs have no network at all");
    }
    if config.network_deny.is_empty() {
        return check(
            NAME,
            Status::Warning,
            "network_deny is empty: networked runs can reach the host's loopback services and cloud metadata",
            Some("remove the empty network_deny / NETWORK_DENY to get the default list".into()),
        );
    }
    if !root {
        return check(
            NAME,
            Status::Warning,
            "not root: no guard; networked runs reach whatever this user can",
            Some("run as root (sudo sandbox ...)".into()),
        );
    }
    let denied = config
        .network_deny
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    match crate::isolation::netguard::NetGuard::install(
        &config.network_deny,
        crate::isolation::uids::SANDBOX_UIDS,
    ) {
        Ok(_guard) => ok(
            NAME,
            format!("nftables rejects {denied} for networked runs"),
        ),
        Err(e) => check(
            NAME,
            Status::Warning,
            e.to_string(),
            Some(pm.install(Need::Nftables)),
        ),
    }
}
