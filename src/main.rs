//! `sandbox`: run untrusted Python 3 and Node.js snippets in a jail, as a Dify-compatible
//! HTTP service (`serve`), from the command line (`run`), and check a host (`doctor`).
#![deny(unsafe_code)]

mod api;
mod cli;
mod config;
mod container;
mod deps;
mod doctor;
mod engine;
mod isolation;
mod job;
mod metrics;
mod runtime;
mod state;

use std::process::ExitCode;

use clap::Parser;

/// See Cargo.toml: musl's allocator is slow under concurrency; glibc's is kept as it is.
#[cfg(target_env = "musl")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Internal entry points, reached only through /proc/self/exe: they must run before
    // anything starts a thread (the helper forks).
    let args: Vec<String> = std::env::args().collect();
    match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("__exec"), _) => return exit(isolation::helper::main()),
        (Some("__zygote"), _) => return exit(isolation::zygote::main()),
        (Some("__probe"), Some(dir)) => return exit(isolation::detect::probe_main(dir)),
        (Some("__probe-chroot"), _) => return exit(isolation::detect::probe_chroot_main()),
        _ => {}
    }
    let cli = cli::Cli::parse();
    cli::execute(cli)
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
