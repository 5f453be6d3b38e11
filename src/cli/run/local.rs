//! A local run: the configuration with the command's limits, the engine, the run's own
//! directories (`stage`), its stdin fed while it runs, then `--out` copied back.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;

use super::collect::collect;
use super::invocation::Script;
use super::report::{Outcome, stdin_cut_note};
use super::{LocalRun, RunArgs, StopSignals, usage};
use crate::engine::network::NetworkPolicy;
use crate::engine::{Engine, RunError, RunFiles, RunRequest, Sink, StdinFeed, Stream};

use crate::job::stage::{Input, Stage, StageError, Stager};
use crate::state::StateDir;

/// Send SIGINT to the run's init, which forwards it to the snippet; false when there is
/// no such process (yet).
fn interrupt_run() -> bool {
    crate::job::interrupt::init_under(nix::unistd::Pid::this())
        .is_some_and(crate::job::interrupt::interrupt)
}

pub(super) fn run_local(args: &RunArgs, run: LocalRun) -> anyhow::Result<ExitCode> {
    let mut inputs = Vec::new();
    for (raws, dir) in [(&args.input_dirs, true), (&args.input_files, false)] {
        for raw in raws {
            inputs.push(Input::parse(raw, dir).map_err(usage)?);
        }
    }
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).map_err(|e| {
            usage(format!(
                "--out {}: cannot create it: {e}; give a directory you can write",
                out.display()
            ))
        })?;
    }
    let mut config = crate::cli::load_config(args.config.as_deref())?;
    if let Some(t) = run.timeout {
        config.worker_timeout = t;
    }
    if let Some(m) = run.memory {
        config.memory_limit_mb = m;
    }
    if let Some(p) = run.processes {
        config.max_processes = p;
    }
    if let Some(o) = run.output {
        config.max_output_bytes = usize::try_from(o).unwrap_or(usize::MAX);
    }
    if let Some(t) = run.tmp {
        config.tmp_size_mb = t;
    }
    // Without --network nothing of the network needs preparing.
    config.enable_network &= args.network;
    config.max_workers = 1;
    // One run: a fork server would cost more to start than it saves.
    config.python_fork_server = false;
    let (state, tmp_bytes) = (StateDir::new(&config.state_dir), config.tmp_size_mb << 20);
    let sink: Option<Sink> = (!args.json).then(|| {
        Arc::new(|stream: Stream, bytes: &[u8]| {
            // A closed terminal or pipe must not stop the run; its result still counts.
            let _ = match stream {
                Stream::Stdout => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(bytes).and_then(|_| out.flush())
                }
                Stream::Stderr => std::io::stderr().lock().write_all(bytes),
            };
        }) as Sink
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let engine = rt.block_on(Engine::build(config))?;
    if let (true, NetworkPolicy::Shared { guarded: false, .. }) =
        (args.network, engine.network.policy())
    {
        eprintln!(
            "sandbox: warning: the run shares this host's network unguarded ({})",
            engine.network.describe()
        );
    }

    // The dependency files changed since the state directory's packages were installed:
    // installed first (a CI job's `dependencies/` works without a server).
    rt.block_on(engine.install_changed_packages(|line| eprintln!("sandbox: {line}")));

    // /job and /tmp/out need a mount namespace; the chroot level runs without them.
    let private = engine.host.level.private_root();
    if !private && (!inputs.is_empty() || args.out.is_some()) {
        return Err(RunError::FilesNeedPrivateRoot.into());
    }
    let stage = match private {
        true => Some(Stage::create(&state).with_context(|| {
            format!(
                "cannot create the run's directories under {}; check the state directory (state_dir / SANDBOX_STATE_DIR)",
                state.runs().display()
            )
        })?),
        false => None,
    };
    let script = Script::of(args);
    if let Some(stage) = &stage {
        // What the user gave is theirs to fix (exit code 2); the stage failing is not.
        let failed = |e: StageError| match e.is_usage() {
            true => usage(e),
            false => anyhow::Error::new(e),
        };
        let mut stager = Stager::new(&stage.job, run.max_input_mb).map_err(failed)?;
        for input in &inputs {
            stager.add(input).map_err(failed)?;
        }
        if let Script::File(name) = &script {
            stager.add_script(name, &run.code).map_err(failed)?;
        }
    }
    let mut how = run.how;
    how.filename = script.filename(
        run.language,
        stage.is_some(),
        args.input_type.as_deref() == Some("module"),
    );
    let feed = run
        .stdin
        .map(|source| StdinFeed::new(source, run.max_input_mb << 20));
    let fed = feed.as_ref().map(StdinFeed::report);
    // SIGTERM or SIGHUP (or a second SIGINT) stop the run: killed, then cleaned up like
    // any other end, so nothing of it (process, cgroup, stage) outlives the command.
    let cancel = CancellationToken::new();
    let stop_signal = rt
        .block_on(async { StopSignals::new() })
        .context("cannot watch for SIGINT and SIGTERM")?;
    let request = RunRequest {
        language: run.language,
        code: run.code,
        preload: String::new(),
        network: args.network,
        sink,
        invocation: how,
        stdin: feed,
        files: stage
            .as_ref()
            .map(Stage::files)
            .unwrap_or_else(RunFiles::default),
        // The command's status is the run's own, known once its last process is gone;
        // --out is collected only after that.
        wait_for_exit: true,
        cancel: Some(cancel.clone()),
    };
    let (outcome, stopped_by) = rt.block_on(async {
        let run = engine.execute(request);
        tokio::pin!(run);
        let mut stop_signal = stop_signal;
        let mut stopped_by = None;
        let mut interrupted = false;
        loop {
            tokio::select! {
                outcome = &mut run => return (outcome, stopped_by),
                signal = stop_signal.recv(), if stopped_by.is_none() => {
                    // The first SIGINT goes to the snippet, as python3 and node get it
                    // (KeyboardInterrupt, a handler); a second one, or SIGTERM or
                    // SIGHUP, kills the run.
                    if signal == Signal::SIGINT && !interrupted && interrupt_run() {
                        interrupted = true;
                        continue;
                    }
                    stopped_by = Some(signal);
                    cancel.cancel();
                }
            }
        }
    });
    let outcome = outcome.map_err(|e| match e {
        RunError::NetworkDisabled => usage(
            "--network is refused: enable_network is false in the configuration (ENABLE_NETWORK)",
        ),
        e @ RunError::TooFewProcesses { .. } => usage(e),
        other => other.into(),
    })?;
    let mut result = Outcome::from(outcome);
    if let Some(signal) = stopped_by {
        result.notes.push(format!(
            "stopped by {}: the run was killed",
            signal.as_str()
        ));
        result.exit_code = 128 + signal as i32;
        result.limit = None;
    }
    if fed.is_some_and(|r| r.cut()) {
        result.notes.push(stdin_cut_note(run.max_input_mb));
    }
    // Every process of the run is gone: what is in /tmp/out stays as it is.
    if let (Some(dir), Some(stage)) = (&args.out, &stage) {
        match collect(&stage.out, dir, tmp_bytes) {
            Ok(c) => (result.files, result.refused) = (c.files, c.refused),
            Err(e) => result.refused.push(e.to_string()),
        }
    }
    drop(stage);
    Ok(result.finish(args.json, true))
}
