//! `sandbox run --engine docker`: the same command line, run by the `sandbox` in a
//! container. The current directory is bound read-only at its own path (the script and
//! inputs resolve as they would here), `--out` read-write, any other absolute path the
//! arguments name read-only; stdin, stdout, stderr and the exit status pass through,
//! SIGINT and SIGTERM are sent on into the container.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use bollard::container::LogOutput;
use bollard::query_parameters::{AttachContainerOptionsBuilder, KillContainerOptionsBuilder};
use futures::StreamExt;

use super::{Engine, forwarded_env, runtime};

/// What `sandbox run` exits with when the sandbox itself failed (as locally).
const EXIT_SANDBOX: u8 = 125;

pub fn execute(args: Vec<String>) -> ExitCode {
    let result = runtime().and_then(|rt| rt.block_on(run(args)));
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(EXIT_SANDBOX)),
        Err(e) => {
            eprintln!("sandbox: {e:#}");
            ExitCode::from(EXIT_SANDBOX)
        }
    }
}

/// The host paths the container needs: `(host path, read-write)`.
fn paths_named(args: &[String], cwd: &Path) -> Result<Vec<(PathBuf, bool)>> {
    let mut out = vec![(cwd.to_path_buf(), false)];
    let mut iter = args.iter().peekable();
    while let Some(arg) = iter.next() {
        let (flag, value) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        if flag == "--out" {
            let Some(dir) = value.or_else(|| iter.next().cloned()) else {
                continue;
            };
            let dir = std::path::absolute(&dir)?;
            // A bind needs its source: made here, as `sandbox run` would make it.
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create --out {}", dir.display()))?;
            out.push((dir, true));
            continue;
        }
        let candidate = value.unwrap_or_else(|| arg.clone());
        // `--file PATH:DEST` and `--dir DIR:DEST` name PATH.
        let path = [
            candidate.as_str(),
            candidate.split(':').next().unwrap_or(""),
        ]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_absolute() && p.exists());
        if let Some(path) = path.filter(|p| !p.starts_with(cwd)) {
            out.push((path.to_path_buf(), false));
        }
    }
    Ok(out)
}

async fn run(args: Vec<String>) -> Result<i64> {
    let engine = Engine::connect().await?;
    engine.require_image().await?;
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let binds = paths_named(&args, &cwd)?
        .into_iter()
        .map(|(p, rw)| format!("{0}:{0}{1}", p.display(), if rw { "" } else { ":ro" }))
        .collect();
    let feed_stdin = !std::io::stdin().is_terminal();
    let mut argv = vec!["run".to_string()];
    argv.extend(args);
    let id = engine
        .create(argv, binds, forwarded_env(), |body| {
            body.working_dir = Some(cwd.display().to_string());
            body.attach_stdin = Some(feed_stdin);
            body.open_stdin = Some(feed_stdin);
            body.stdin_once = Some(feed_stdin);
            body.attach_stdout = Some(true);
            body.attach_stderr = Some(true);
        })
        .await?;
    let result = follow(&engine, &id, feed_stdin).await;
    let code = match result {
        Ok(()) => engine.exit_code(&id).await,
        Err(e) => Err(e),
    };
    engine.remove(&id).await;
    code
}

/// Attach, start, pass the streams and signals through until the container's output ends.
async fn follow(engine: &Engine, id: &str, feed_stdin: bool) -> Result<()> {
    let options = AttachContainerOptionsBuilder::default()
        .stream(true)
        .stdin(feed_stdin)
        .stdout(true)
        .stderr(true)
        .build();
    let attached = engine
        .docker
        .attach_container(id, Some(options))
        .await
        .context("cannot attach to the container")?;
    engine
        .docker
        .start_container(id, None)
        .await
        .context("cannot start the container")?;
    if feed_stdin {
        let mut input = attached.input;
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut stdin = tokio::io::stdin();
            let _ = tokio::io::copy(&mut stdin, &mut input).await;
            let _ = input.shutdown().await;
        });
    }
    let mut output = attached.output;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let signal = tokio::select! {
            item = output.next() => match item {
                None => return Ok(()),
                Some(item) => {
                    write_out(item.context("lost the container's output")?)?;
                    continue;
                }
            },
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        // The `sandbox run` inside takes it as it would here.
        let options = KillContainerOptionsBuilder::default()
            .signal(signal)
            .build();
        let _ = engine.docker.kill_container(id, Some(options)).await;
    }
}

fn write_out(item: LogOutput) -> Result<()> {
    match item {
        LogOutput::StdOut { message } | LogOutput::Console { message } => {
            let mut out = std::io::stdout().lock();
            out.write_all(&message)?;
            out.flush()?;
        }
        LogOutput::StdErr { message } => {
            let mut err = std::io::stderr().lock();
            err.write_all(&message)?;
            err.flush()?;
        }
        LogOutput::StdIn { .. } => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_directory_out_and_outside_paths_are_bound() {
        let outside = tempfile::tempdir().unwrap();
        let cwd = tempfile::tempdir().unwrap();
        let out = outside.path().join("results");
        let input = outside.path().join("in.csv");
        std::fs::write(&input, "a").unwrap();
        let args: Vec<String> = vec![
            "job.py".into(),
            "--out".into(),
            out.display().to_string(),
            input.display().to_string(),
            "/does/not/exist".into(),
            format!("--file={}:data.csv", input.display()),
        ];
        let got = paths_named(&args, cwd.path()).unwrap();
        assert_eq!(
            got,
            vec![
                (cwd.path().to_path_buf(), false),
                (out.clone(), true),
                (input.clone(), false),
                (input, false),
            ]
        );
        assert!(out.is_dir());
    }
}
