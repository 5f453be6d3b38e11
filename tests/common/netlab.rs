//! A stand-in external host for network tests: a network namespace of its own joined to
//! this host by a veth pair (`198.51.100.1` here, `198.51.100.2` there: TEST-NET-2, which
//! nothing routes), running a TCP server that answers `pong:<what it got>`, a UDP echo,
//! and a DNS resolver that knows `ext.test`; on demand it also answers on an address in
//! each private range, routed into it (`private_addresses`). One lab per test process,
//! shared by its tests; its servers end with the test process, and its namespace and
//! veth pair (and the routes through it) are removed by the next test process that
//! makes a lab.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const HOST_SIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const TCP_PORT: u16 = 7002;
pub const UDP_PORT: u16 = 7003;
pub const NAME: &str = "ext.test";

const PREFIX: &str = "lab";

/// The servers of the external host, in Python: small, and obviously not the code under
/// test.
const SERVERS: &str = r#"
import os, socket, socketserver, struct, threading, time
def orphaned():
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)
class Tcp(socketserver.BaseRequestHandler):
    def handle(self):
        data = self.request.recv(4096)
        self.request.sendall(b"pong:" + data)
class ReusingTcp(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
def udp_echo():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 7003))
    while True:
        d, a = s.recvfrom(4096)
        s.sendto(b"echo:" + d, a)
def dns():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("198.51.100.2", 53))
    while True:
        q, a = s.recvfrom(512)
        qid, flags, qd = struct.unpack(">HHH", q[:6])
        i = 12
        labels = []
        while q[i]:
            labels.append(q[i + 1:i + 1 + q[i]].decode().lower()); i += 1 + q[i]
        qtype = struct.unpack(">H", q[i + 1:i + 3])[0]
        question = q[12:i + 5]
        known = ".".join(labels) == "ext.test"
        answer = b""
        if known and qtype == 1:
            answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton("198.51.100.2")
        rcode = 0 if known else 3
        header = struct.pack(">HHHHHH", qid, 0x8180 | rcode, 1, 1 if answer else 0, 0, 0)
        s.sendto(header + question + answer, a)
threading.Thread(target=orphaned, daemon=True).start()
threading.Thread(target=udp_echo, daemon=True).start()
threading.Thread(target=dns, daemon=True).start()
ReusingTcp(("0.0.0.0", 7002), Tcp).serve_forever()
"#;

pub struct Lab {
    pub netns: String,
    host_if: String,
    servers: std::sync::Mutex<Option<Child>>,
    private: OnceLock<Vec<Ipv4Addr>>,
}

fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)")
}

fn must(args: &[&str]) {
    let o = ip(args);
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// This process's lab, made on first use.
pub fn lab() -> &'static Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(Lab::create)
}

impl Lab {
    fn create() -> Self {
        remove_stale();
        let pid = std::process::id();
        let netns = format!("{PREFIX}{pid}");
        let host_if = format!("{PREFIX}h{pid}");
        must(&["netns", "add", &netns]);
        must(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ]);
        must(&["addr", "add", &format!("{HOST_SIDE}/24"), "dev", &host_if]);
        must(&["link", "set", &host_if, "up"]);
        for args in [
            vec!["addr", "add", "198.51.100.2/24", "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
            vec!["link", "set", "lo", "up"],
            vec!["route", "add", "default", "via", "198.51.100.1"],
        ] {
            let mut full = vec!["-n", netns.as_str()];
            full.extend(args);
            must(&full);
        }
        let servers = Command::new("ip")
            .args(["netns", "exec", &netns, "python3", "-c", SERVERS])
            .stdout(Stdio::null())
            .spawn()
            .expect("start the lab's servers");
        let lab = Lab {
            netns,
            host_if,
            servers: std::sync::Mutex::new(Some(servers)),
            private: OnceLock::new(),
        };
        lab.wait_ready();
        lab
    }

    /// Run `args` inside the lab's namespace.
    pub fn exec(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect_timeout(
                &(EXT, TCP_PORT).into(),
                Duration::from_millis(200),
            )
            .is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the lab's servers did not start");
    }

    pub fn host_interface(&self) -> &str {
        &self.host_if
    }

    /// The lab's addresses in private ranges (10/8, 172.16/12, 192.168/16, 100.64/10),
    /// standing for an operator's internal hosts; the lab's servers answer there too.
    /// Each is routed to the lab by a host route of this host (a /32: the most specific
    /// route there is), and `ip route get` must show it going into the lab's veth before
    /// any test uses it, so nothing sent to it can leave the machine. The last two
    /// octets come from the test process's pid, so labs of several test processes do
    /// not share addresses.
    pub fn private_addresses(&self) -> &[Ipv4Addr] {
        self.private.get_or_init(|| {
            let pid = std::process::id();
            let (a, b) = (((pid >> 8) & 0xff) as u8, (pid % 254 + 1) as u8);
            let addresses = [
                Ipv4Addr::new(10, 254, a, b),
                Ipv4Addr::new(172, 31, a, b),
                Ipv4Addr::new(192, 168, a, b),
                Ipv4Addr::new(100, 127, a, b),
            ];
            for addr in addresses {
                let host = format!("{addr}/32");
                must(&["-n", &self.netns, "addr", "add", &host, "dev", "eth0"]);
                must(&[
                    "route",
                    "replace",
                    &host,
                    "via",
                    &EXT.to_string(),
                    "dev",
                    &self.host_if,
                ]);
                let route = ip(&["-o", "route", "get", &addr.to_string()]);
                let text = String::from_utf8_lossy(&route.stdout);
                assert!(
                    route.status.success()
                        && text.contains(&format!(" via {EXT} dev {} ", self.host_if)),
                    "{addr} is not routed into the lab, refusing to use it: {text}"
                );
            }
            addresses.to_vec()
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Ok(mut s) = self.servers.lock()
            && let Some(mut child) = s.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.netns]);
    }
}

/// Labs of test processes that are gone.
fn remove_stale() {
    let list = ip(&["netns", "list"]);
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip")
                .args(["netns", "pids", name])
                .output()
                .map(|o| {
                    for p in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-9", p]).status();
                    }
                });
            let _ = ip(&["link", "del", &format!("{PREFIX}h{pid}")]);
            let _ = ip(&["netns", "del", name]);
        }
    }
}
