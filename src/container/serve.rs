//! `sandbox serve --engine docker`: the server in a container, its port published on
//! this host (127.0.0.1 unless `SANDBOX_PUBLISH_ADDRESS` says otherwise), its log
//! followed here; SIGINT or SIGTERM stops it (gracefully, as `serve` stops) and removes
//! the container.

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use bollard::container::LogOutput;
use bollard::models::PortBinding;
use bollard::query_parameters::{LogsOptionsBuilder, StopContainerOptionsBuilder};
use futures::StreamExt;

use super::{Engine, forwarded_env, runtime, short};

const DEFAULT_PORT: &str = "8194";

pub fn execute(args: Vec<String>) -> ExitCode {
    match runtime().and_then(|rt| rt.block_on(serve(args))) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("sandbox: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn serve(args: Vec<String>) -> Result<i64> {
    let engine = Engine::connect().await?;
    engine.require_image().await?;
    let port = std::env::var("SANDBOX_PORT")
        .ok()
        .filter(|p| !p.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_PORT.to_string());
    let address = std::env::var("SANDBOX_PUBLISH_ADDRESS")
        .ok()
        .filter(|a| !a.trim().is_empty())
        .unwrap_or_else(|| "127.0.0.1".to_string());
    let mut env = forwarded_env();
    env.push(format!("SANDBOX_PORT={port}"));
    let mut argv = vec!["serve".to_string()];
    argv.extend(args);
    let exposed = format!("{port}/tcp");
    let id = engine
        .create(argv, Vec::new(), env, |body| {
            body.exposed_ports = Some(vec![exposed.clone()]);
            if let Some(host) = body.host_config.as_mut() {
                host.port_bindings = Some(HashMap::from([(
                    exposed.clone(),
                    Some(vec![PortBinding {
                        host_ip: Some(address.clone()),
                        host_port: Some(port.clone()),
                    }]),
                )]));
            }
        })
        .await?;
    let result = run(&engine, &id, &address, &port).await;
    engine.remove(&id).await;
    result
}

async fn run(engine: &Engine, id: &str, address: &str, port: &str) -> Result<i64> {
    engine
        .docker
        .start_container(id, None)
        .await
        .context("cannot start the container")?;
    eprintln!(
        "sandbox: serving at http://{address}:{port} from container {} ({}, engine {}); Ctrl-C stops it",
        short(id),
        engine.target.image,
        engine.found_at
    );
    let options = LogsOptionsBuilder::default()
        .follow(true)
        .stdout(true)
        .stderr(true)
        .build();
    let mut logs = engine.docker.logs(id, Some(options));
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (mut stopping, mut stop_sent) = (false, false);
    loop {
        tokio::select! {
            item = logs.next() => match item {
                None => break,
                Some(Ok(LogOutput::StdIn { .. })) => {}
                Some(Ok(out)) => {
                    let mut err = std::io::stderr().lock();
                    let _ = err.write_all(&out.into_bytes());
                }
                Some(Err(e)) => return Err(e).context("lost the container's log"),
            },
            _ = interrupt.recv(), if !stopping => stopping = true,
            _ = terminate.recv(), if !stopping => stopping = true,
        }
        if stopping && !stop_sent {
            stop_sent = true;
            // As `serve` stops: in-flight runs finish (each bounded by worker_timeout).
            let options = StopContainerOptionsBuilder::default().t(120).build();
            let docker = engine.docker.clone();
            let id = id.to_string();
            tokio::spawn(async move { docker.stop_container(&id, Some(options)).await });
        }
    }
    let code = engine.exit_code(id).await?;
    Ok(if stopping { 0 } else { code })
}
