//! The uid guard: for runs that share the host's network namespace (the chroot level,
//! or `network_isolation: shared`), an nftables table on the output hook refuses what
//! sockets of the sandbox uids may not reach: every address of the host itself, every
//! server's runs (their veth pairs, runs' subnets), the denied blocks unless an allow
//! entry opens them, and everything outside the allow-list when there is one. DNS to
//! the host's resolvers and the configured proxies stay reachable. It matches the
//! sandbox uids only, so the server and the rest of the host are untouched.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

use ipnet::{IpNet, Ipv4Net};

use super::nft::{self, NftError, Table};
use super::ruleset;
use crate::config::AllowRule;

pub const TABLE_PREFIX: &str = "sandbox_guard_";

/// What the guard lets through and refuses.
pub struct GuardRules<'a> {
    pub uids: Range<u32>,
    pub resolvers: &'a [IpAddr],
    pub proxies: &'a [SocketAddr],
    /// Runs' subnets: this configuration's and the default.
    pub subnets: &'a [Ipv4Net],
    /// Every denied block (`network_deny` and the private ranges).
    pub deny: &'a [IpNet],
    pub allow: &'a [AllowRule],
}

/// The installed guard; dropping it deletes its table.
#[derive(Debug)]
pub struct NetGuard {
    table: Table,
}

impl NetGuard {
    pub fn install(rules: &GuardRules<'_>) -> Result<Self, NftError> {
        let name = Table::name_for(TABLE_PREFIX);
        let script = script(&name, rules);
        Ok(Self {
            table: Table::install(name, &script)?,
        })
    }

    /// Whether the guard would install here, found without installing it.
    pub fn check(rules: &GuardRules<'_>) -> Result<(), NftError> {
        Table::check(&script(&Table::name_for(TABLE_PREFIX), rules))
    }

    pub fn table(&self) -> &str {
        self.table.name()
    }
}

fn script(name: &str, rules: &GuardRules<'_>) -> String {
    ruleset::guard(&ruleset::Guard {
        table: name,
        uids: rules.uids.clone(),
        resolvers: rules.resolvers,
        proxies: rules.proxies,
        subnets: rules.subnets,
        deny: rules.deny,
        allow: rules.allow,
    })
}

/// Delete guard tables whose server is gone: they would keep restricting every sandbox
/// uid of the host.
pub fn remove_stale_tables() {
    for name in nft::remove_stale(TABLE_PREFIX) {
        tracing::info!(table = %name, "removed the network guard of a server that is gone");
    }
}
