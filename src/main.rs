//! `sandbox`: run untrusted Python 3 and Node.js snippets in a jail, as a Dify-compatible
//! HTTP service (`serve`), from the command line (`run`), and check a host (`doctor`).
#![deny(unsafe_code)]

mod cli;
mod container;
mod protocol;

// The jail and everything built on it: Linux only (see `container` for elsewhere).
#[cfg(target_os = "linux")]
mod api;
#[cfg(target_os = "linux")]
mod config;
#[cfg(target_os = "linux")]
mod deps;
#[cfg(target_os = "linux")]
mod doctor;
#[cfg(target_os = "linux")]
mod engine;
#[cfg(target_os = "linux")]
mod isolation;
#[cfg(target_os = "linux")]
mod job;
#[cfg(target_os = "linux")]
mod metrics;
#[cfg(target_os = "linux")]
mod runtime;
#[cfg(target_os = "linux")]
mod state;

use std::process::ExitCode;

use clap::Parser;

/// See Cargo.toml: musl's allocator is slow under concurrency; glibc's is kept as it is.
#[cfg(target_env = "musl")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    #[cfg(target_os = "linux")]
    if let Some(code) = internal_entry() {
        return code;
    }
    let cli = cli::Cli::parse();
    cli::execute(cli)
}

#[cfg(target_os = "linux")]
fn internal_entry() -> Option<ExitCode> {
    // Internal entry points, reached only through /proc/self/exe: they must run before
    // anything starts a thread (the helper forks).
    let args: Vec<String> = std::env::args().collect();
    let code = match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("__exec"), _) => isolation::helper::main(),
        (Some("__zygote"), _) => isolation::zygote::main(),
        (Some("__probe"), Some(dir)) => isolation::detect::probe_main(dir),
        (Some("__probe-chroot"), _) => isolation::detect::probe_chroot_main(),
        _ => return None,
    };
    Some(exit(code))
}

#[cfg(target_os = "linux")]
fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
