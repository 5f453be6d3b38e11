//! Command-line interface: one file per subcommand.

pub mod doctor;
pub mod run;
pub mod serve;

#[cfg(target_os = "linux")]
use std::path::Path;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[cfg(target_os = "linux")]
use crate::config::ConfigError;
#[cfg(target_os = "linux")]
pub use crate::config::load_config;
use crate::container::{self, EngineKind};
#[cfg(target_os = "linux")]
use crate::engine::BuildError;
#[cfg(target_os = "linux")]
use crate::runtime::DiscoveryError;

/// Exit code for bad configuration or input (clap uses it too for bad arguments).
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "sandbox",
    version,
    about = "Run untrusted Python 3 and Node.js code in a jail; a drop-in Dify sandbox"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Where the command runs: on this host, or by a `sandbox` in a container of the
    /// local Docker engine (the default where the jail cannot exist, such as macOS).
    #[arg(long, global = true, env = "SANDBOX_ENGINE", value_enum, default_value_t = EngineKind::default_here())]
    pub engine: EngineKind,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the Dify sandbox HTTP API.
    Serve(serve::ServeArgs),
    /// Run one snippet locally in the sandbox.
    Run(Box<run::RunArgs>),
    /// Check what this host allows and how `serve` would isolate runs.
    Doctor(doctor::DoctorArgs),
}

pub fn execute(cli: Cli) -> ExitCode {
    match (cli.engine, cli.command) {
        // A run on a server is this process's own, wherever it is.
        (_, Command::Run(args)) if args.server.is_some() => run::execute(*args),
        // The same arguments, for the `sandbox` in the container.
        (EngineKind::Docker, Command::Serve(_)) => container::serve(container::args_after("serve")),
        (EngineKind::Docker, Command::Run(_)) => container::run(container::args_after("run")),
        (EngineKind::Docker, Command::Doctor(_)) => {
            container::doctor(container::args_after("doctor"))
        }
        (EngineKind::Local, command) => local(command),
    }
}

#[cfg(target_os = "linux")]
fn local(command: Command) -> ExitCode {
    match command {
        Command::Serve(args) => report(serve::execute(args)),
        Command::Run(args) => run::execute(*args),
        Command::Doctor(args) => doctor::execute(args),
    }
}

/// Where the jail cannot exist, `--engine local` is refused with the way that works.
#[cfg(not(target_os = "linux"))]
fn local(command: Command) -> ExitCode {
    let name = match command {
        Command::Serve(_) => "serve",
        Command::Run(_) => "run",
        Command::Doctor(_) => "doctor",
    };
    eprintln!(
        "sandbox: `{name} --engine local` needs Linux (namespaces, seccomp); here `sandbox {name}` runs in a container of the local Docker engine: use --engine docker (the default) or unset SANDBOX_ENGINE"
    );
    ExitCode::from(if name == "run" {
        run::EXIT_SANDBOX_FAILED
    } else {
        1
    })
}

/// Print an error chain and pick the exit code: 2 for configuration problems.
#[cfg(target_os = "linux")]
pub fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandbox: {e:#}");
            ExitCode::from(exit_code_for(&e))
        }
    }
}

pub fn exit_code_for(e: &anyhow::Error) -> u8 {
    let usage = e
        .chain()
        .any(|c| c.is::<run::UsageError>() || is_configuration(c));
    if usage { EXIT_USAGE } else { 1 }
}

#[cfg(target_os = "linux")]
fn is_configuration(c: &(dyn std::error::Error + 'static)) -> bool {
    c.is::<ConfigError>()
        || c.is::<DiscoveryError>()
        || c.downcast_ref::<BuildError>()
            .is_some_and(BuildError::is_usage)
}

#[cfg(not(target_os = "linux"))]
fn is_configuration(_: &(dyn std::error::Error + 'static)) -> bool {
    false
}

/// Logs go to stderr and, when `log_path` is set and writable, to a daily file there;
/// as text or JSON lines. The returned guard flushes the file on drop: keep it alive
/// while serving.
#[cfg(target_os = "linux")]
pub fn init_tracing(
    debug: bool,
    json: bool,
    log_path: &Path,
) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let default = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SANDBOX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let mut layers: Vec<Box<dyn Layer<_> + Send + Sync>> = Vec::new();
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    layers.push(if json {
        stderr.json().boxed()
    } else {
        stderr.boxed()
    });
    let mut guard = None;
    let mut file_error = None;
    let appender = (!log_path.as_os_str().is_empty()).then(|| {
        std::fs::create_dir_all(log_path)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                tracing_appender::rolling::RollingFileAppender::builder()
                    .rotation(tracing_appender::rolling::Rotation::DAILY)
                    .filename_prefix("sandbox.log")
                    .build(log_path)
                    .map_err(|e| e.to_string())
            })
    });
    match appender {
        Some(Err(e)) => file_error = Some(e),
        Some(Ok(appender)) => {
            let (writer, g) = tracing_appender::non_blocking(appender);
            let file = tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(writer);
            layers.push(if json {
                file.json().boxed()
            } else {
                file.boxed()
            });
            guard = Some(g);
        }
        None => {}
    }
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(layers)
        .try_init();
    if let Some(e) = file_error {
        tracing::warn!(
            log_path = %log_path.display(),
            error = %e,
            "cannot write the log file; logging to stderr only (set log_path / LOG_PATH to a writable directory, or to \"\" for none)"
        );
    }
    guard
}
