//! Runs' networks on this server, in two parts kept apart:
//!
//! - `policy`: what networked runs may get here (their own namespace, the host's network
//!   behind the uid guard or not, nothing), a pure decision from the configuration and
//!   the host's level, narrowed when what it needs cannot be installed. Admission, each
//!   run's preparation, the warm pool and `sandbox doctor` all ask it.
//! - `server`: what the server installs for it, server-wide (nftables tables,
//!   forwarding, the DNS relay, the namespaces kept for reuse), and each networked run's
//!   namespace made from it.

mod policy;
mod server;

pub use policy::NetworkPolicy;
pub use server::{ServerNetwork, dry_run, try_namespace};
