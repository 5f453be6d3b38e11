//! What the soak sends: hello and Dify's payloads with network off and on, a networked
//! echo, and snippets that hit a limit or a refusal on purpose, each with the answer it
//! must get.

use std::net::IpAddr;

use serde_json::{Value, json};

use crate::common::clip;
use crate::common::payloads::{self, Lang, Payload, succeeded};

/// The limits the soak's server runs with, lowered so that bombs end quickly.
pub struct Limits {
    pub memory_mb: u64,
    pub max_processes: u64,
    pub max_output_bytes: usize,
    pub tmp_size_mb: u64,
    pub timeout_s: u64,
}

impl Limits {
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("MEMORY_LIMIT_MB", self.memory_mb.to_string()),
            ("MAX_PROCESSES", self.max_processes.to_string()),
            ("MAX_OUTPUT_BYTES", self.max_output_bytes.to_string()),
            ("TMP_SIZE_MB", self.tmp_size_mb.to_string()),
            ("WORKER_TIMEOUT", self.timeout_s.to_string()),
        ]
    }
}

enum Want {
    Payload(Payload),
    Stdout(String),
    /// A failed run whose `error` holds one of these phrases.
    Error(&'static [&'static str]),
    /// Exit code -1 and `error` starting with `timeout`.
    Timeout,
    /// The output limit's note and exactly this many bytes of stdout kept.
    Output(usize),
}

pub struct Kind {
    /// `<what>/<network off or on>`.
    pub name: String,
    pub body: Value,
    want: Want,
}

impl Kind {
    fn new(name: &str, lang: Lang, code: String, network: bool, want: Want) -> Self {
        Self {
            name: format!("{name}/{}", if network { "on" } else { "off" }),
            body: json!({"language": lang.wire(), "code": code, "preload": "", "enable_network": network}),
            want,
        }
    }

    /// Both network settings of the same snippet.
    fn both(name: &str, lang: Lang, code: &str, want: impl Fn() -> Want) -> [Self; 2] {
        [false, true].map(|net| Self::new(name, lang, code.to_string(), net, want()))
    }

    /// Whether an HTTP 200 answer is what this kind must produce.
    pub fn check(&self, envelope: &Value) -> Result<(), String> {
        let data = &envelope["data"];
        let error = data["error"].as_str().unwrap_or_default();
        let stdout = data["stdout"].as_str().unwrap_or_default();
        let failed = envelope["code"] == 0 && data["exit_code"] != 0;
        let ok = match &self.want {
            Want::Payload(p) => return p.check(envelope),
            Want::Stdout(want) => {
                succeeded(envelope)?;
                stdout == want
            }
            Want::Error(phrases) => failed && phrases.iter().any(|p| error.contains(p)),
            Want::Timeout => data["exit_code"] == -1 && error.starts_with("timeout"),
            Want::Output(n) => {
                failed && error.contains("output limit exceeded") && stdout.len() == *n
            }
        };
        if ok {
            return Ok(());
        }
        Err(format!(
            "code {}, exit code {}, stdout {} bytes {:?}, error {:?}",
            envelope["code"],
            data["exit_code"],
            stdout.len(),
            clip(stdout, 80),
            clip(error, 300)
        ))
    }
}

/// What most traffic is: hello and Dify's payloads, alternately offline and networked,
/// and a networked run that talks TCP to itself over its own loopback.
pub fn ordinary() -> Vec<Kind> {
    let mut kinds = Vec::new();
    for p in payloads::all() {
        for network in [false, true] {
            kinds.push(Kind {
                name: format!("{}/{}", p.key, if network { "on" } else { "off" }),
                body: p.body(network),
                want: Want::Payload(p.clone()),
            });
        }
    }
    let echo = "import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()\n\
                c = socket.create_connection(s.getsockname(), timeout=2)\n\
                a, _ = s.accept()\nc.sendall(b'ping')\nprint(a.recv(4).decode())";
    let want = Want::Stdout("ping\n".into());
    kinds.push(Kind::new("py-echo", Lang::Python, echo.into(), true, want));
    kinds
}

const EPERM: &[&str] = &["operation not permitted"];
const MEMORY: &[&str] = &["memory limit exceeded"];

/// Snippets that must be stopped or refused, each with both network settings except
/// where the network is the point.
pub fn abusive(limits: &Limits, host: IpAddr, port: u16) -> Vec<Kind> {
    let (py, node) = (Lang::Python, Lang::Node);
    let threads = format!(
        "import threading, time\nfor _ in range({}):\n    \
         threading.Thread(target=time.sleep, args=(1,), daemon=True).start()",
        limits.max_processes + 32
    );
    let disk = "with open('/tmp/fill', 'wb') as f:\n    while True:\n        \
                f.write(b'x' * (1 << 20)); f.flush()";
    let mut kinds: Vec<Kind> = [
        Kind::both(
            "py-memory",
            py,
            "blocks = []\nwhile True:\n    blocks.append(bytearray(8 << 20))",
            || Want::Error(MEMORY),
        ),
        Kind::both(
            "node-memory",
            node,
            "const a = []; while (true) a.push(Buffer.alloc(1e7, 1));",
            || Want::Error(MEMORY),
        ),
        Kind::both("py-fork", py, "import os\nos.fork()", || Want::Error(EPERM)),
        Kind::both(
            "node-spawn",
            node,
            "require('child_process').execSync('id')",
            || Want::Error(EPERM),
        ),
        Kind::both("py-threads", py, &threads, || {
            Want::Error(&["process limit reached"])
        }),
        Kind::both("py-output", py, "while True:\n    print('x' * 999)", || {
            Want::Output(limits.max_output_bytes)
        }),
        Kind::both(
            "node-output",
            node,
            "const line = 'y'.repeat(100000); setInterval(() => process.stdout.write(line), 0);",
            || Want::Output(limits.max_output_bytes),
        ),
        Kind::both("py-disk", py, disk, || {
            Want::Error(&["No space left on device", "File too large"])
        }),
        Kind::both("py-timeout", py, "while True:\n    pass", || Want::Timeout),
    ]
    .into_iter()
    .flatten()
    .collect();
    let connect = |to: IpAddr| {
        format!("import socket\nsocket.create_connection(('{to}', {port}), timeout=2)")
    };
    kinds.push(Kind::new(
        "py-socket",
        py,
        connect(host),
        false,
        Want::Error(EPERM),
    ));
    kinds.push(Kind::new(
        "node-socket",
        node,
        format!("require('net').connect({port}, '{host}').on('error', e => {{ console.error(e.code); process.exit(3); }});"),
        false,
        Want::Error(EPERM),
    ));
    // Networked runs never reach the host: not over its address, and their loopback is
    // their own, where the server's port is closed.
    let refused = || Want::Error(&["Connection refused"]);
    kinds.push(Kind::new("py-host", py, connect(host), true, refused()));
    let loopback = IpAddr::from([127, 0, 0, 1]);
    kinds.push(Kind::new(
        "py-loopback",
        py,
        connect(loopback),
        true,
        refused(),
    ));
    kinds
}

/// The host's own address other than loopback: the source of the default route.
pub fn host_address() -> IpAddr {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
    // Connecting a UDP socket sends nothing; it only picks the route and its source.
    probe
        .connect("192.0.2.1:9")
        .and_then(|()| probe.local_addr())
        .expect("a route to the outside to find this host's address")
        .ip()
}
