//! The security corpus for Node.js, run for real against `sandbox serve`.

#![cfg(target_os = "linux")]

mod common;

common::needs_root!();

use common::Server;
use serde_json::{Value, json};

async fn node(s: &Server, code: &str) -> Value {
    s.run("nodejs", code).await
}

fn out(d: &Value) -> String {
    d["stdout"].as_str().unwrap_or_default().to_string()
}

fn error(d: &Value) -> String {
    d["error"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn child_process_is_refused_in_every_form() {
    let s = Server::start(&[]).await;
    let code = r#"
const cp = require('child_process');
const tries = {
  exec: () => new Promise(r => cp.exec('id', e => r(e ? e.code || e.message : 'RAN'))),
  execSync: () => { try { cp.execSync('id'); return 'RAN' } catch (e) { return e.code || e.message } },
  spawnSync: () => { const r = cp.spawnSync('/bin/ls'); return r.error ? r.error.code : 'RAN' },
  spawn: () => new Promise(r => { const c = cp.spawn('/bin/ls'); c.on('error', e => r(e.code)); c.on('exit', () => r('RAN')) }),
  fork: () => new Promise(r => { try { const c = cp.fork('/tmp/x.js'); c.on('error', e => r(e.code)); c.on('exit', () => r('RAN')) } catch (e) { r(e.code) } }),
  execFileSync: () => { try { cp.execFileSync(process.execPath, ['-e', '1']); return 'RAN' } catch (e) { return e.code } },
};
(async () => {
  for (const [k, f] of Object.entries(tries)) {
    let v;
    try { v = await f(); } catch (e) { v = e.code || e.message; }
    console.log(k, v);
  }
})();
"#;
    let data = node(&s, code).await;
    let text = out(&data);
    assert_eq!(text.lines().count(), 6, "{data}");
    for line in text.lines() {
        assert!(line.ends_with("EPERM"), "{line} / {data}");
    }
    assert!(s.healthy().await);
}

#[tokio::test]
async fn process_binding_spawn_sync_cannot_start_anything() {
    let s = Server::start(&[]).await;
    let code = r#"
const ss = process.binding('spawn_sync');
const r = ss.spawn({file: '/bin/sh', args: ['sh', '-c', 'echo PWNED'], envPairs: [], stdio: [
  {type: 'pipe', readable: true, writable: false},
  {type: 'pipe', readable: false, writable: true},
  {type: 'pipe', readable: false, writable: true}]});
console.log('status', r.status, 'error', r.error);
"#;
    let data = node(&s, code).await;
    assert!(!out(&data).contains("PWNED"), "{data}");
    assert!(
        out(&data).contains("error -1"),
        "spawn fails with EPERM (-1): {data}"
    );
}

#[tokio::test]
async fn worker_threads_run_but_stay_jailed() {
    let s = Server::start(&[]).await;
    let code = r#"
const { Worker } = require('worker_threads');
const src = `
  const { parentPort } = require('worker_threads');
  const fs = require('fs');
  let spawn;
  try { require('child_process').execSync('id'); spawn = 'RAN' } catch (e) { spawn = e.code }
  parentPort.postMessage({ passwd: fs.readFileSync('/etc/passwd', 'utf8').includes('daemon:'), spawn, uid: process.getuid() });
`;
const w = new Worker(src, { eval: true });
w.on('message', m => console.log(JSON.stringify(m)));
"#;
    let data = node(&s, code).await;
    let v: Value = serde_json::from_str(out(&data).trim()).unwrap_or(Value::Null);
    assert_eq!(v["passwd"], false, "{data}");
    assert_eq!(v["spawn"], "EPERM", "{data}");
    assert!(v["uid"].as_u64().unwrap() >= 10000, "{data}");
}

#[tokio::test]
async fn dlopen_of_a_host_library_outside_the_root_fails() {
    let planted = "/var/tmp/sandbox-test-lib.so";
    std::fs::copy("/proc/self/exe", planted).ok();
    let s = Server::start(&[]).await;
    let code = r#"
for (const lib of ['/var/tmp/sandbox-test-lib.so', '/usr/lib/x86_64-linux-gnu/security/pam_unix.so', '/tmp/copy.node']) {
  try {
    if (lib.startsWith('/tmp')) require('fs').copyFileSync(process.execPath, lib);
    process.dlopen({ exports: {} }, lib);
    console.log(lib, 'LOADED');
  } catch (e) { console.log(lib, 'refused'); }
}
"#;
    let data = node(&s, code).await;
    let _ = std::fs::remove_file(planted);
    assert!(!out(&data).contains("LOADED"), "{data}");
    assert_eq!(out(&data).lines().count(), 3, "{data}");
}

#[tokio::test]
async fn host_files_and_other_processes_are_invisible() {
    let s = Server::start(&[]).await;
    let code = format!(
        "const fs = require('fs');\nconsole.log(fs.readFileSync('/etc/passwd', 'utf8').includes('daemon:'));\nconsole.log(fs.existsSync('/etc/shadow'), fs.existsSync('/proc/{}/cmdline'));\nconsole.log(fs.readdirSync('/proc').filter(p => /^\\d+$/.test(p)).join(','));",
        s.pid()
    );
    let data = node(&s, &code).await;
    // The run and its init (pid 1 of the namespace), nothing else.
    assert_eq!(out(&data), "false\nfalse false\n1,2\n", "{data}");
}

#[tokio::test]
async fn net_connect_without_network_is_refused() {
    common::netlab::lab();
    let (host, port) = (common::netlab::EXT, common::netlab::TCP_PORT);
    let s = Server::start(&[]).await;
    let code = format!(
        "const s = require('net').connect({port}, '{host}');\ns.on('connect', () => {{ console.log('connected'); s.end(); }});\ns.on('error', e => console.log('error', e.code));"
    );
    let data = node(&s, &code).await;
    assert_eq!(out(&data), "error EPERM\n", "{data}");
    let (_, env) = s
        .run_json(json!({"language": "nodejs", "code": code, "enable_network": true}))
        .await;
    assert_eq!(env["data"]["stdout"], "connected\n", "{env}");
}

#[tokio::test]
async fn redeclaring_parseint_cannot_disable_the_sandbox() {
    let s = Server::start(&[]).await;
    // The original's Node bootstrap called parseInt after user declarations were hoisted.
    let code = r#"
function parseInt() { return -1; }
var JSON = { parse: () => ({}), stringify: () => '' };
function require2() {}
let r;
try { require('child_process').execSync('id'); r = 'RAN'; } catch (e) { r = e.code; }
console.log(parseInt('5'), r);
"#;
    let data = node(&s, code).await;
    assert_eq!(out(&data), "-1 EPERM\n", "{data}");
}

#[tokio::test]
async fn a_memory_bomb_reports_the_memory_limit() {
    let s = Server::start(&[("MEMORY_LIMIT_MB", "128")]).await;
    for code in [
        "const a = []; while (true) a.push(new Array(1e6).fill(1));",
        "const a = []; while (true) a.push(Buffer.alloc(1e7, 1));",
    ] {
        let data = node(&s, code).await;
        assert_ne!(data["exit_code"], 0, "{data}");
        assert!(error(&data).contains("memory limit"), "{code}: {data}");
    }
    assert!(s.healthy().await);
}

#[tokio::test]
async fn an_output_flood_is_cut_at_the_limit() {
    // A timeout well above the time a busy machine needs to fill the memory limit.
    let s = Server::start(&[("MAX_OUTPUT_BYTES", "500000"), ("WORKER_TIMEOUT", "20")]).await;
    // Writes that let the event loop run reach the pipe: the output limit stops them.
    let data = node(
        &s,
        "const line = 'y'.repeat(100000); setInterval(() => process.stdout.write(line), 0);",
    )
    .await;
    assert!(error(&data).contains("output limit"), "{}", error(&data));
    assert_eq!(out(&data).len(), 500_000);
    // A loop that never yields only queues writes inside Node: memory stops it first.
    let data = node(
        &s,
        "const line = 'y'.repeat(1000); while (true) process.stdout.write(line);",
    )
    .await;
    let e = error(&data);
    assert!(
        e.contains("output limit") || e.contains("memory limit"),
        "{e}"
    );
    assert!(out(&data).len() <= 500_000);
    assert!(s.healthy().await);
}

#[tokio::test]
async fn killing_the_parent_or_everyone_reaches_nobody() {
    let s = Server::start(&[]).await;
    let code = r#"
const r = [];
for (const [pid, sig] of [[process.ppid, 'SIGKILL'], [0, 'SIGTERM'], [-1, 'SIGKILL'], [1, 'SIGSTOP']]) {
  try { if (pid !== process.pid) process.kill(pid, sig); r.push(pid + ':sent'); } catch (e) { r.push(pid + ':' + e.code); }
}
console.log(r.join(' '));
"#;
    let data = node(&s, code).await;
    assert!(s.healthy().await, "the server survives: {data}");
    assert_eq!(
        node(&s, "console.log('still serving')").await["stdout"],
        "still serving\n"
    );
}
