//! `sandbox serve`: the HTTP API.

use std::path::PathBuf;
#[cfg(target_os = "linux")]
use std::sync::Arc;

#[cfg(target_os = "linux")]
use anyhow::Context;
use clap::Args;

#[cfg(target_os = "linux")]
use crate::api;
#[cfg(target_os = "linux")]
use crate::engine::network::{NetworkPolicy, ServerNetwork};
#[cfg(target_os = "linux")]
use crate::engine::{Engine, ProbeError};
#[cfg(target_os = "linux")]
use crate::runtime::Language;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (default: conf/config.yaml if present, else built-in defaults).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

/// glibc malloc arenas the server may use (see `sys::cap_malloc_arenas`).
#[cfg(target_os = "linux")]
const MALLOC_ARENAS: i32 = 2;

#[cfg(target_os = "linux")]
pub fn execute(args: ServeArgs) -> anyhow::Result<()> {
    let config = super::load_config(args.config.as_deref())?;
    let _log_guard = super::init_tracing(config.debug, config.log_json, &config.log_path);
    // Connections are capped below this limit (see api::server), so it is read first.
    let nofile = match api::server::raise_descriptor_limit() {
        Ok((soft, hard)) => {
            tracing::info!(soft, hard, "descriptor limit (RLIMIT_NOFILE)");
            soft
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the descriptor limit; assuming 1024");
            1024
        }
    };
    // A long-lived server with a thread pool: bounded allocator arenas keep its resident
    // memory flat (see sys::cap_malloc_arenas).
    crate::isolation::sys::cap_malloc_arenas(MALLOC_ARENAS);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let engine = Arc::new(Engine::build(config).await?);
        serve(engine, nofile).await
    })
}

#[cfg(target_os = "linux")]
async fn serve(engine: Arc<Engine>, nofile: u64) -> anyhow::Result<()> {
    let config = engine.config.clone();
    tracing::info!(level = engine.host.level.describe(), "isolation");
    match &engine.host.cgroup {
        Some(cg) => tracing::info!(cgroup = %cg.describe(), "memory and process limits by cgroup"),
        None => {
            tracing::warn!("no writable cgroup: memory and process limits fall back to rlimits")
        }
    }
    log_network(&engine.network);
    let addr = config.listen_addr();
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen on {addr}: is another service using port {}? Set SANDBOX_PORT",
            config.port
        )
    })?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    if config.default_key_exposed() {
        tracing::warn!(
            "SECURITY: the API key is the public default `{}` and the server listens on {addr}: anyone who can reach this port can run code here. Set API_KEY (or app.key in the config file) to a long random secret, and give Dify the same value as CODE_EXECUTION_API_KEY",
            crate::config::DEFAULT_KEY
        );
    }
    let limits = api::server::ConnLimits::new(&config, nofile);
    tracing::info!(
        max_connections = limits.max_connections,
        header_read_timeout_s = limits.deadlines.header_read.as_secs(),
        keepalive_timeout_s = limits.deadlines.keepalive.as_secs(),
        "connection limits"
    );
    if !api::server::fits_descriptor_limit(&config, &limits, nofile) {
        tracing::warn!(
            max_connections = limits.max_connections,
            nofile,
            "max_connections leaves runs too few of the {nofile} descriptors allowed: under load, runs may fail with too many open files. Lower max_connections (MAX_CONNECTIONS) or raise the descriptor limit"
        );
    }
    engine.start_warm_pool();
    engine.spawn_package_updates(config.python_deps_update_interval);
    // The probes run once the server listens: a root still being built (the chroot
    // level) must not hold up /health. A server where no language runs stops.
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<String>();
    let probing = engine.clone();
    tokio::spawn(async move {
        if let Err(e) = probe_languages(&probing).await {
            let _ = failed_tx.send(format!("{e:#}"));
        }
    });
    let none_runs = std::sync::Mutex::new(None);
    let stop = async {
        tokio::select! {
            () = shutdown_signal() => {}
            failed = failed_rx => match failed {
                Ok(reason) => {
                    tracing::error!(%reason, "stopping: no language runs in the jail");
                    if let Ok(mut slot) = none_runs.lock() {
                        *slot = Some(reason);
                    }
                }
                // The probes passed: only a signal stops the server.
                Err(_) => shutdown_signal().await,
            },
        }
    };
    let state = api::AppState::new(engine.clone());
    api::server::serve(listener, api::router(state), limits, stop).await;
    engine.close().await;
    if let Some(reason) = none_runs.lock().ok().and_then(|mut r| r.take()) {
        anyhow::bail!(reason);
    }
    tracing::info!("stopped: in-flight runs finished");
    Ok(())
}

/// One real jailed run per language the server has (`Engine::probe`), at once: a
/// language is said ready only once it ran a snippet; one that cannot is logged as an
/// error with its fix (its runs would fail); an error when none can.
#[cfg(target_os = "linux")]
async fn probe_languages(engine: &Engine) -> anyhow::Result<()> {
    let mut available = Vec::new();
    for lang in Language::ALL {
        match engine.runtime(lang) {
            Ok(_) => available.push(lang),
            Err(e) => tracing::warn!(language = %lang, error = %e, "language disabled"),
        }
    }
    let probes = available
        .iter()
        .map(|&lang| async move { (lang, engine.probe(lang).await) });
    let mut failed = Vec::new();
    for (lang, result) in futures::future::join_all(probes).await {
        let Ok(rt) = engine.runtime(lang) else {
            continue;
        };
        match result {
            Ok(()) => {
                tracing::info!(language = %lang, program = %rt.program.display(), version = %rt.version, binds = rt.root.binds.len(), "language ready: a jailed run passed")
            }
            Err(e) => {
                tracing::error!(
                    language = %lang,
                    program = %rt.program.display(),
                    error = %e,
                    fix = %ProbeError::fix(lang),
                    "LANGUAGE FAILS: a jailed run did not run, so every {lang} run would fail; `sandbox doctor` says more"
                );
                failed.push(format!("{lang}: {e}"));
            }
        }
    }
    if !available.is_empty() && failed.len() == available.len() {
        anyhow::bail!(
            "no language runs in the jail ({}); run `sandbox doctor`",
            failed.join("; ")
        );
    }
    Ok(())
}

/// SIGTERM or SIGINT: stop accepting, let in-flight runs finish (each is bounded by
/// worker_timeout), then exit.
#[cfg(target_os = "linux")]
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    tracing::info!("shutting down: draining in-flight runs");
}

/// The network level, loudly when runs share the host's network or get none.
#[cfg(target_os = "linux")]
fn log_network(network: &ServerNetwork) {
    let level = network.describe();
    match network.policy() {
        NetworkPolicy::Off | NetworkPolicy::Isolated => tracing::info!(%level, "network"),
        NetworkPolicy::Shared {
            guarded: true,
            requested: false,
        } => tracing::info!(%level, "network"),
        NetworkPolicy::Shared { .. } => tracing::warn!(
            %level,
            "network: NETWORKED RUNS SHARE THIS HOST'S NETWORK (network_isolation: shared)"
        ),
        NetworkPolicy::Refused(_) => tracing::error!(
            %level,
            "network: NETWORKED RUNS ARE REFUSED until this is fixed"
        ),
    }
}
