pub mod apply;
pub mod policy;
pub mod programs;

pub use programs::{Programs, Start};
