//! Network interfaces by name, on a netlink handle: what making a run's namespace and
//! keeping one for reuse both need.

use futures::TryStreamExt;
use rtnetlink::Handle;

/// The index of the interface `name`, if it exists.
pub(super) async fn index_of(handle: &Handle, name: &str) -> Option<u32> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Some(link.header.index),
        _ => None,
    }
}

/// Remove the interface `name`, if it exists (its veth peer goes with it).
pub(super) async fn remove_link(host: &Handle, name: &str) {
    if let Some(index) = index_of(host, name).await {
        let _ = host.link().del(index).execute().await;
    }
}
