//! Networks for runs. Every run has a network namespace of its own; a networked one is
//! joined to the host by a veth pair and leaves through the host with NAT, under an
//! nftables table the server owns (`ruleset::isolated`). Where namespaces cannot be made
//! (the chroot level) or the operator asks for the host's network, a uid-matched guard
//! (`guard`) restricts what runs' sockets reach instead.
//!
//! - `addressing`: a run's /30, interface name and conntrack mark, from its uid.
//! - `netns`: creating runs' namespaces and veth pairs (rtnetlink), and removing those of
//!   servers that are gone; `kept`: what a run's network holds on the host, released or
//!   kept for the next run; `traces`: whether a run left anything in its namespace.
//! - `ruleset`: the nftables rules, as text; `nft`: loading and owning tables.
//! - `forwarding`: IPv4 forwarding and other firewalls' FORWARD policies.
//! - `conntrack`: forgetting a run's connections when it ends.
//! - `dns`: the relay that answers runs' queries on their gateway.
//! - `resolv`: /etc/resolv.conf, the host's and a run's.
//! - `guard`: the uid guard for runs in the host's network namespace.

pub mod addressing;
pub mod conntrack;
pub mod dns;
pub mod forwarding;
pub mod guard;
mod kept;
mod links;
pub mod netns;
pub mod nft;
pub mod resolv;
pub mod ruleset;
pub mod traces;
