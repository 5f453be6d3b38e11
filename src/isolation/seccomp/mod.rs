pub mod apply;
pub mod policy;

pub use apply::{FilterOptions, SocketPolicy, apply, export};
