//! Extra packages for both languages, for real: npm and pip against the real registries
//! (and an offline directory), run in the installer's jail, live without a restart.

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use std::path::Path;
use std::time::{Duration, Instant};

use common::Server;
use serde_json::{Value, json};

/// Until `language`'s list holds every one of `names`.
async fn wait_listed(s: &Server, language: &str, names: &[&str], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = s.listed(language).await;
        if names.iter().all(|n| got.iter().any(|(name, _)| name == n)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{names:?} not installed for {language} within {within:?}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Dify's JavaScript code node, as its client sends it: `main` called on the inputs,
/// the result printed between markers.
fn dify_javascript(main: &str) -> String {
    format!(
        "{main}\nvar inputs_obj = JSON.parse(Buffer.from('e30=', 'base64').toString('utf-8'))\n\
         var output_obj = main(inputs_obj)\nvar output_json = JSON.stringify(output_obj)\n\
         var result = `<<RESULT>>${{output_json}}<<RESULT>>`\nconsole.log(result)\n"
    )
}

fn result_of(data: &Value) -> Value {
    let out = data["stdout"].as_str().unwrap();
    let inner = out
        .split("<<RESULT>>")
        .nth(1)
        .unwrap_or_else(|| panic!("no result in {data}"));
    serde_json::from_str(inner).unwrap()
}

fn server_env<'a>(
    state: &'a Path,
    deps: &'a Path,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, String)> {
    let mut env = vec![
        ("SANDBOX_STATE_DIR", state.display().to_string()),
        (
            "DEPENDENCIES_PATH",
            deps.join("python-requirements.txt").display().to_string(),
        ),
        (
            "NODEJS_DEPENDENCIES_PATH",
            deps.join("package.json").display().to_string(),
        ),
        ("ENABLE_NETWORK", "true".to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    env
}

async fn start(env: &[(&str, String)], log: &Path) -> Server {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start_logging(&env, log).await
}

#[tokio::test]
async fn node_packages_are_required_listed_and_go_live_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let deps = dir.path().join("deps");
    std::fs::create_dir(&deps).unwrap();
    let manifest = deps.join("package.json");
    std::fs::write(
        &manifest,
        r#"{"dependencies": {"lodash": "^4.17.21", "dayjs": "^1.11.0"}}"#,
    )
    .unwrap();
    let state = dir.path().join("state");
    let env = server_env(&state, &deps, &[("WORKER_TIMEOUT", "90")]);
    let s = start(&env, &dir.path().join("log")).await;
    wait_listed(&s, "nodejs", &["lodash", "dayjs"], Duration::from_secs(180)).await;
    let versions = s.listed("nodejs").await;
    assert!(
        versions
            .iter()
            .all(|(_, v)| v.split('.').count() == 3 && !v.is_empty()),
        "versions listed: {versions:?}"
    );

    // A Dify JavaScript node that requires both.
    let code = dify_javascript(
        "function main() {\n  const _ = require('lodash');\n  const dayjs = require('dayjs');\n  return { chunks: _.chunk([1, 2, 3, 4], 2), day: dayjs('2024-01-02').format('YYYY/MM/DD') };\n}",
    );
    let data = s.run("nodejs", &code).await;
    assert_eq!(
        result_of(&data),
        json!({"chunks": [[1, 2], [3, 4]], "day": "2024/01/02"}),
        "{data}"
    );

    // A run started before the switch: it has lodash, and still lacks the third package
    // after the new generation went live.
    let old = s.spawn_run(json!({"language": "nodejs", "code": "
        require('lodash');
        setTimeout(() => {
          try { require('is-number'); console.log('new generation'); }
          catch (e) { console.log(e.code === 'MODULE_NOT_FOUND' ? 'old generation' : e.message); }
        }, 25000);"}));
    tokio::time::sleep(Duration::from_secs(2)).await;
    std::fs::write(
        &manifest,
        r#"{"dependencies": {"lodash": "^4.17.21", "dayjs": "^1.11.0", "is-number": "7.0.0"}}"#,
    )
    .unwrap();
    let changed = Instant::now();
    wait_listed(&s, "nodejs", &["is-number"], Duration::from_secs(60)).await;
    let fresh = s
        .run(
            "nodejs",
            "console.log(require('is-number')(5), require('lodash').VERSION.length > 0)",
        )
        .await;
    assert_eq!(fresh["stdout"], "true true\n", "{fresh}");
    let live_after = changed.elapsed();
    assert!(
        !old.is_finished(),
        "the earlier run must still be running when the new generation is live"
    );
    let old = old.await.unwrap();
    assert_eq!(old["code"], 0, "{old}");
    assert_eq!(old["data"]["stdout"], "old generation\n", "{old}");
    assert_eq!(old["data"]["exit_code"], 0, "{old}");
    eprintln!("a new package was usable {live_after:?} after the file changed");
    assert!(live_after < Duration::from_secs(60));
}

/// Makes a local npm package whose install script tries to reach the host, and reports
/// what it met in `report.json` beside itself.
fn hostile_npm_package(dir: &Path, marker: &Path, canary: &Path, state: &Path, host: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("package.json"),
        r#"{"name": "localpkg", "version": "1.0.0", "main": "index.js", "scripts": {"install": "node install.js"}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("index.js"),
        "module.exports = require('./report.json');\n",
    )
    .unwrap();
    let script = format!(
        "const fs = require('fs');\n\
         const r = {{ uid: process.getuid() }};\n\
         const attempt = (name, f) => {{ try {{ r[name] = f(); }} catch (e) {{ r[name] = 'refused: ' + (e.code || e.status); }} }};\n\
         attempt('marker', () => {{ fs.writeFileSync({marker:?}, 'pwned'); return 'written'; }});\n\
         attempt('canary', () => fs.readFileSync({canary:?}, 'utf8'));\n\
         attempt('state', () => {{ fs.writeFileSync({state:?} + '/pwned', 'x'); return 'written'; }});\n\
         attempt('spawn', () => require('child_process').execSync('echo spawned').toString().trim());\n\
         attempt('unshare', () => require('child_process').execSync('unshare --user true', {{ stdio: 'pipe' }}).toString());\n\
         const [addr, port] = {host:?}.split(':');\n\
         const s = require('net').connect(Number(port), addr);\n\
         const done = (v) => {{ r.host = v; s.destroy(); fs.writeFileSync('report.json', JSON.stringify(r)); }};\n\
         s.setTimeout(3000, () => done('refused: timeout'));\n\
         s.on('connect', () => done('connected'));\n\
         s.on('error', (e) => done('refused: ' + e.code));\n",
        host = host,
        marker = marker.display().to_string(),
        canary = canary.display().to_string(),
        state = state.display().to_string(),
    );
    std::fs::write(dir.join("install.js"), script).unwrap();
}

/// An sdist whose setup.py tries the same as it builds, and puts what it met into the
/// module it installs.
fn hostile_sdist(dir: &Path, marker: &Path, canary: &Path, state: &Path, host: &str) -> String {
    let setup = format!(
        "import json, os, subprocess\n\
         r = {{'uid': os.getuid()}}\n\
         def attempt(name, f):\n\
         \x20   try:\n\
         \x20       r[name] = f()\n\
         \x20   except Exception as e:\n\
         \x20       r[name] = 'refused: ' + type(e).__name__\n\
         def marker():\n\
         \x20   open({marker:?}, 'w').write('pwned'); return 'written'\n\
         def state():\n\
         \x20   open({state:?} + '/pwned', 'w').write('x'); return 'written'\n\
         attempt('marker', marker)\n\
         attempt('canary', lambda: open({canary:?}).read())\n\
         attempt('state', state)\n\
         attempt('spawn', lambda: subprocess.check_output(['echo', 'spawned']).decode().strip())\n\
         attempt('unshare', lambda: subprocess.check_output(['unshare', '--user', 'true'], stderr=subprocess.STDOUT).decode())\n\
         import socket\n\
         addr, port = {host:?}.split(':')\n\
         attempt('host', lambda: socket.create_connection((addr, int(port)), timeout=3) and 'connected')\n\
         os.makedirs('localpy', exist_ok=True)\n\
         open('localpy/__init__.py', 'w').write('REPORT = ' + repr(json.dumps(r)) + '\\n')\n\
         from setuptools import setup\n\
         setup(name='localpy', version='1.0', packages=['localpy'])\n",
        marker = marker.display().to_string(),
        canary = canary.display().to_string(),
        state = state.display().to_string(),
        host = host,
    );
    let src = dir.join("localpy-1.0");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("setup.py"), setup).unwrap();
    std::fs::write(
        src.join("PKG-INFO"),
        "Metadata-Version: 2.1\nName: localpy\nVersion: 1.0\n",
    )
    .unwrap();
    let out = std::process::Command::new("tar")
        .args(["-czf", "localpy-1.0.tar.gz", "localpy-1.0"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::fs::remove_dir_all(&src).unwrap();
    "localpy-1.0.tar.gz".into()
}

fn assert_contained(report: &Value, marker: &Path, canary_text: &str, state: &Path) {
    eprintln!("what the install script met: {report}");
    assert!(
        !marker.exists(),
        "an install script wrote to the host: {report}"
    );
    assert!(
        !report.to_string().contains(canary_text),
        "an install script read the root-only canary: {report}"
    );
    assert!(
        report["canary"].as_str().unwrap().starts_with("refused"),
        "{report}"
    );
    assert!(
        report["marker"].as_str().unwrap().starts_with("refused"),
        "{report}"
    );
    assert!(
        report["state"].as_str().unwrap().starts_with("refused"),
        "{report}"
    );
    assert!(!state.join("pwned").exists());
    // The run network's policy: the host's own addresses are out of reach.
    assert!(
        report["host"].as_str().unwrap().starts_with("refused"),
        "{report}"
    );
    let uid = report["uid"].as_u64().unwrap();
    assert!(
        uid >= 1000,
        "installers run as a sandbox uid, not {uid}: {report}"
    );
    // No namespaces of their own (the installer's seccomp filter).
    assert!(
        report["unshare"].as_str().unwrap().starts_with("refused"),
        "{report}"
    );
    // Package scripts run (exec is allowed to installers), harmlessly.
    assert_eq!(report["spawn"], "spawned", "{report}");
}

#[tokio::test]
async fn install_scripts_run_jailed_and_cannot_reach_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let deps = dir.path().join("deps");
    std::fs::create_dir(&deps).unwrap();
    // Host paths an installer's root holds (read-only): the canary is there and readable
    // by root alone, the marker would be written beside it.
    let host = tempfile::tempdir_in("/usr/local/share").unwrap();
    let marker = host.path().join("marker");
    let canary = host.path().join("canary");
    let canary_text = "root-only canary 7f3a9";
    std::fs::write(&canary, canary_text).unwrap();
    std::fs::set_permissions(&canary, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let state = dir.path().join("state");
    // A service on the host, which networked runs (and so installers) must not reach.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let host = format!(
        "{}:{}",
        common::host_address(),
        listener.local_addr().unwrap().port()
    );
    hostile_npm_package(&deps.join("localpkg"), &marker, &canary, &state, &host);
    std::fs::write(
        deps.join("package.json"),
        r#"{"dependencies": {"localpkg": "file:./localpkg"}}"#,
    )
    .unwrap();
    let sdist = hostile_sdist(&deps, &marker, &canary, &state, &host);
    std::fs::write(deps.join("python-requirements.txt"), format!("./{sdist}\n")).unwrap();
    // A file beside the dependency files that the installers must not see.
    std::fs::write(deps.join("config.yaml"), "app:\n  key: beside-the-deps\n").unwrap();

    let env = server_env(&state, &deps, &[]);
    let s = start(&env, &dir.path().join("log")).await;
    wait_listed(&s, "nodejs", &["localpkg"], Duration::from_secs(180)).await;
    wait_listed(&s, "python3", &["localpy"], Duration::from_secs(180)).await;

    let node = s
        .run("nodejs", "console.log(JSON.stringify(require('localpkg')))")
        .await;
    let report: Value = serde_json::from_str(node["stdout"].as_str().unwrap().trim())
        .unwrap_or_else(|_| panic!("{node}"));
    assert_contained(&report, &marker, canary_text, &state);

    let py = s.python("import localpy; print(localpy.REPORT)").await;
    let report: Value = serde_json::from_str(py["stdout"].as_str().unwrap().trim())
        .unwrap_or_else(|_| panic!("{py}"));
    assert_contained(&report, &marker, canary_text, &state);

    assert!(
        listener.accept().is_err(),
        "an install script reached a service on the host"
    );

    // What went live is root's and read-only to every sandbox uid.
    for language in ["python-packages", "nodejs-packages"] {
        let live = std::fs::canonicalize(state.join(language).join("current")).unwrap();
        let out = std::process::Command::new("find")
            .arg(&live)
            .args(["(", "!", "-uid", "0", "-o", "-perm", "/022", ")", "-print"])
            .output()
            .unwrap();
        assert!(
            out.stdout.is_empty(),
            "not root's or writable by others: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[tokio::test]
async fn a_broken_dependency_file_keeps_the_previous_generation_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let deps = dir.path().join("deps");
    std::fs::create_dir(&deps).unwrap();
    let manifest = deps.join("package.json");
    std::fs::write(&manifest, r#"{"dependencies": {"is-number": "7.0.0"}}"#).unwrap();
    let state = dir.path().join("state");
    let log = dir.path().join("log");
    let env = server_env(&state, &deps, &[]);
    let s = start(&env, &log).await;
    wait_listed(&s, "nodejs", &["is-number"], Duration::from_secs(180)).await;

    let unknown = "no-such-package-for-the-sandbox-tests-4711";
    std::fs::write(
        &manifest,
        format!(r#"{{"dependencies": {{"is-number": "7.0.0", "{unknown}": "1.0.0"}}}}"#),
    )
    .unwrap();
    // Noticed and tried without being asked; npm's own message is reported.
    let deadline = Instant::now() + Duration::from_secs(120);
    let failed = loop {
        let text = reqwest::get(format!("{}/metrics", s.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("sandbox_packages_last_install_ok{language=\"nodejs\"} 0") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no failed install reported:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        failed.contains("sandbox_packages_installed{language=\"nodejs\"} 1"),
        "{failed}"
    );
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains(unknown) && log_text.contains("404"),
        "npm's message in the log: {log_text}"
    );
    // The previous generation still serves.
    let data = s
        .run("nodejs", "console.log(require('is-number')('7'))")
        .await;
    assert_eq!(data["stdout"], "true\n", "{data}");
    // The endpoints say so too.
    let update = s
        .post_json("/v1/sandbox/dependencies/update", json!({}))
        .await;
    assert_eq!(update["code"], -500, "{update}");
    assert!(
        update["message"].as_str().unwrap().contains(unknown),
        "{update}"
    );

    // `sandbox doctor` shows the failure with npm's message.
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = common::sandbox(&["doctor", "--json"], &env);
    let report: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", common::stderr(&out)));
    let check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "nodejs packages")
        .unwrap_or_else(|| panic!("{report}"))
        .clone();
    assert_eq!(check["status"], "warning", "{check}");
    assert!(
        check["detail"].as_str().unwrap().contains(unknown),
        "{check}"
    );
    assert!(s.healthy().await);
}

#[tokio::test]
async fn air_gapped_installs_come_from_the_offline_directory() {
    let dir = tempfile::tempdir().unwrap();
    let deps = dir.path().join("deps");
    let offline = deps.join("offline");
    std::fs::create_dir_all(&offline).unwrap();
    std::fs::write(deps.join("python-requirements.txt"), "six==1.16.0\n").unwrap();
    std::fs::write(
        deps.join("package.json"),
        r#"{"dependencies": {"is-number": "7.0.0"}}"#,
    )
    .unwrap();
    // Filled on a connected machine, as the README says.
    let pip = std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-r",
            "python-requirements.txt",
            "-d",
            "offline",
        ])
        .current_dir(&deps)
        .output()
        .unwrap();
    assert!(
        pip.status.success(),
        "{}",
        String::from_utf8_lossy(&pip.stderr)
    );
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    std::fs::copy(deps.join("package.json"), scratch.join("package.json")).unwrap();
    let npm = std::process::Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--cache"])
        .arg(offline.join("npm-cache"))
        .current_dir(&scratch)
        .output()
        .unwrap();
    assert!(
        npm.status.success(),
        "{}",
        String::from_utf8_lossy(&npm.stderr)
    );

    // No index reachable: runs get no network, and the mirrors lead nowhere.
    let state = dir.path().join("state");
    let env = server_env(
        &state,
        &deps,
        &[
            ("ENABLE_NETWORK", "false"),
            ("PIP_MIRROR_URL", "http://127.0.0.1:9/simple"),
            ("NPM_MIRROR_URL", "http://127.0.0.1:9/"),
        ],
    );
    let s = start(&env, &dir.path().join("log")).await;
    wait_listed(&s, "python3", &["six"], Duration::from_secs(120)).await;
    wait_listed(&s, "nodejs", &["is-number"], Duration::from_secs(120)).await;
    let py = s.python("import six; print(six.__version__)").await;
    assert_eq!(py["stdout"], "1.16.0\n", "{py}");
    let node = s
        .run("nodejs", "console.log(require('is-number')(1))")
        .await;
    assert_eq!(node["stdout"], "true\n", "{node}");
}

#[test]
fn sandbox_run_installs_what_changed_then_requires_and_imports_it() {
    let dir = tempfile::tempdir().unwrap();
    let deps = dir.path().join("deps");
    std::fs::create_dir(&deps).unwrap();
    std::fs::write(
        deps.join("package.json"),
        r#"{"dependencies": {"is-number": "7.0.0"}}"#,
    )
    .unwrap();
    let job = dir.path().join("job.mjs");
    std::fs::write(
        &job,
        "import isNumber from 'is-number';\nimport { createRequire } from 'module';\n\
         const require = createRequire(import.meta.url);\n\
         console.log(isNumber(4), require('is-number')('x'));\n",
    )
    .unwrap();
    let state = dir.path().join("state");
    let manifest = deps.join("package.json");
    let env = [
        ("SANDBOX_STATE_DIR", state.to_str().unwrap()),
        ("NODEJS_DEPENDENCIES_PATH", manifest.to_str().unwrap()),
    ];
    let first = common::sandbox(&["run", "--network", job.to_str().unwrap()], &env);
    assert_eq!(
        common::stdout(&first),
        "true false\n",
        "{}",
        common::stderr(&first)
    );
    assert!(
        common::stderr(&first).contains("installing nodejs packages"),
        "{}",
        common::stderr(&first)
    );
    // Installed once: the next run says nothing and needs no network.
    let again = common::sandbox(&["run", job.to_str().unwrap()], &env);
    assert_eq!(common::stdout(&again), "true false\n");
    assert_eq!(common::stderr(&again), "");
    assert_eq!(again.status.code(), Some(0));
}

#[tokio::test]
async fn a_python_run_in_flight_keeps_the_generation_it_started_with() {
    let dir = tempfile::tempdir().unwrap();
    let deps = dir.path().join("deps");
    std::fs::create_dir(&deps).unwrap();
    let reqs = deps.join("python-requirements.txt");
    std::fs::write(&reqs, "six==1.16.0\n").unwrap();
    let state = dir.path().join("state");
    let env = server_env(&state, &deps, &[("WORKER_TIMEOUT", "90")]);
    let s = start(&env, &dir.path().join("log")).await;
    wait_listed(&s, "python3", &["six"], Duration::from_secs(180)).await;
    // Imports six only after the switch (a fork server's run, as Dify's are).
    let old = s.spawn_run(json!({"language": "python3", "code":
        "import time\ntime.sleep(20)\nimport six\nprint(six.__version__)"}));
    tokio::time::sleep(Duration::from_secs(2)).await;
    std::fs::write(&reqs, "six==1.15.0\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !s
        .listed("python3")
        .await
        .contains(&("six".into(), "1.15.0".into()))
    {
        assert!(Instant::now() < deadline, "{:?}", s.listed("python3").await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let fresh = s.python("import six; print(six.__version__)").await;
    assert_eq!(fresh["stdout"], "1.15.0\n", "{fresh}");
    assert!(
        !old.is_finished(),
        "the earlier run must outlive the switch"
    );
    let old = old.await.unwrap();
    assert_eq!(old["data"]["stdout"], "1.16.0\n", "{old}");
}
