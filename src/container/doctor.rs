//! `sandbox doctor --engine docker`: the engine, the image, the Linux binary, and what
//! level the container gets (the `sandbox doctor` inside, asked for its JSON report),
//! each with a fix.

use std::process::ExitCode;

use anyhow::{Context, Result};
use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptionsBuilder;
use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;

use super::{Engine, forwarded_env, runtime};

#[derive(Debug, Serialize)]
struct Check {
    name: &'static str,
    status: &'static str,
    detail: String,
    fix: Option<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    checks: Vec<Check>,
    /// The report of the `sandbox doctor` inside the container.
    inside: Option<Value>,
    ok: bool,
}

pub fn execute(args: Vec<String>) -> ExitCode {
    let json = args.iter().any(|a| a == "--json");
    let report = match runtime() {
        Ok(rt) => rt.block_on(checks(args)),
        Err(e) => Report {
            checks: vec![failed("async runtime", format!("{e:#}"), None)],
            inside: None,
            ok: false,
        },
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("sandbox: cannot write the report: {e}"),
        }
    } else {
        for c in &report.checks {
            println!("{:<8} {}: {}", c.status, c.name, c.detail);
            if let Some(fix) = &c.fix {
                println!("         fix: {fix}");
            }
        }
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn failed(name: &'static str, detail: String, fix: Option<String>) -> Check {
    Check {
        name,
        status: "failed",
        detail,
        fix,
    }
}

fn ok(name: &'static str, detail: String) -> Check {
    Check {
        name,
        status: "ok",
        detail,
        fix: None,
    }
}

async fn checks(args: Vec<String>) -> Report {
    let mut checks = Vec::new();
    let done = |checks: Vec<Check>, inside: Option<Value>| {
        let ok = !checks.iter().any(|c: &Check| c.status == "failed");
        Report { checks, inside, ok }
    };
    let engine = match Engine::connect().await {
        Ok(engine) => engine,
        Err(e) => {
            checks.push(failed(
                "docker engine",
                format!("{e:#}"),
                Some("start a Docker engine (Docker Desktop, colima, OrbStack, or dockerd on Linux), or set DOCKER_HOST".into()),
            ));
            return done(checks, None);
        }
    };
    let version = engine
        .docker
        .version()
        .await
        .ok()
        .and_then(|v| v.version)
        .unwrap_or_default();
    checks.push(ok(
        "docker engine",
        format!(
            "Docker {version} at {}, linux/{}",
            engine.found_at, engine.arch
        ),
    ));
    match engine.require_image().await {
        Ok(()) => checks.push(ok("image", engine.target.image.clone())),
        Err(e) => {
            checks.push(failed(
                "image",
                format!("{e:#}"),
                Some(format!(
                    "cargo xtask build-linux --arch {0} && cargo xtask image --arch {0}",
                    engine.arch
                )),
            ));
            return done(checks, None);
        }
    }
    checks.push(match &engine.target.binary {
        Some(binary) => ok(
            "linux binary",
            format!("{} (bound over the image's own)", binary.display()),
        ),
        None => Check {
            name: "linux binary",
            status: "warning",
            detail: format!(
                "none at dist/linux-{}/sandbox or SANDBOX_LINUX_BINARY: the image's own sandbox is used",
                engine.arch
            ),
            fix: Some(format!(
                "cargo xtask build-linux --arch {} for this checkout's binary",
                engine.arch
            )),
        },
    });
    match inside(&engine, args).await {
        Ok(report) => {
            let level = report["isolation"].as_str().unwrap_or("none").to_string();
            let network = report["network"].as_str().unwrap_or("").to_string();
            let problems: Vec<String> = (report["checks"].as_array().into_iter().flatten())
                .filter(|c| c["status"] == "failed")
                .map(|c| {
                    format!(
                        "{}: {} (fix: {})",
                        c["name"].as_str().unwrap_or(""),
                        c["detail"].as_str().unwrap_or(""),
                        c["fix"].as_str().unwrap_or("-")
                    )
                })
                .collect();
            if report["ok"] == true {
                checks.push(ok(
                    "container level",
                    format!("{level}; networked runs: {network}"),
                ));
            } else {
                checks.push(failed(
                    "container level",
                    format!(
                        "the sandbox inside the container fails: {}",
                        problems.join("; ")
                    ),
                    Some("see `inside` in `sandbox doctor --engine docker --json`".into()),
                ));
            }
            done(checks, Some(report))
        }
        Err(e) => {
            checks.push(failed(
                "container level",
                format!("{e:#}"),
                Some(format!(
                    "rebuild the binary and image: cargo xtask build-linux --arch {0} && cargo xtask image --arch {0}",
                    engine.arch
                )),
            ));
            done(checks, None)
        }
    }
}

/// The `sandbox doctor --json` of a container, as the containers of `run` get it.
async fn inside(engine: &Engine, args: Vec<String>) -> Result<Value> {
    let mut argv = vec!["doctor".to_string(), "--json".to_string()];
    argv.extend(args.into_iter().filter(|a| a != "--json"));
    let id = engine
        .create(argv, Vec::new(), forwarded_env(), |_| {})
        .await?;
    let result = async {
        engine
            .docker
            .start_container(&id, None)
            .await
            .context("cannot start the container")?;
        let options = LogsOptionsBuilder::default()
            .follow(true)
            .stdout(true)
            .stderr(true)
            .build();
        let mut logs = engine.docker.logs(&id, Some(options));
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(item) = logs.next().await {
            match item.context("lost the container's output")? {
                LogOutput::StdOut { message } | LogOutput::Console { message } => {
                    stdout.extend_from_slice(&message)
                }
                LogOutput::StdErr { message } => stderr.extend_from_slice(&message),
                LogOutput::StdIn { .. } => {}
            }
        }
        engine.exit_code(&id).await?;
        serde_json::from_slice::<Value>(&stdout).with_context(|| {
            format!(
                "the sandbox in the container gave no report: {}",
                String::from_utf8_lossy(&stderr).trim()
            )
        })
    }
    .await;
    engine.remove(&id).await;
    result
}
