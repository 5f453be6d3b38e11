//! Whether a run left any trace in its network namespace, so the namespace can serve the
//! next run of its uid instead of being destroyed and made again (about 4 ms of the
//! server's CPU and a kernel clean-up per networked run).
//!
//! An unprivileged process can change a network namespace only by sending or receiving
//! packets (counted in the namespace's SNMP counters, loopback included) or by holding
//! sockets (counted in its `sockets: used`, which includes orphaned TCP sockets and unix
//! sockets kept alive by descriptors in flight; TIME_WAIT ones are counted apart). Its
//! addresses, routes, rules and sysctls need CAP_NET_ADMIN over the namespace, which runs
//! never have. So a namespace whose counters and socket counts are what they were when it
//! was made holds nothing of the run that used it: no connection, no neighbour or route
//! cache entry, no TCP metrics, no bound name. Anything else counts as a trace and the
//! namespace is destroyed as before.

use std::fs::File;
use std::io::{Read, Seek};

/// The namespace's own counter files, opened from inside it: a /proc/net file stays bound
/// to the namespace it was opened in, so it can be read after every process there is gone.
pub struct Traces {
    files: Vec<File>,
    made: Reading,
}

/// Counters and socket counts at one moment.
#[derive(Debug, PartialEq, Eq)]
struct Reading {
    /// /proc/net/snmp, netstat, snmp6 and ip6_flowlabel, verbatim: every packet moves
    /// some counter.
    counters: String,
    /// `sockets: used` from /proc/net/sockstat.
    sockets: u64,
    /// TCP sockets in TIME_WAIT (the `tw` of sockstat's TCP line).
    time_wait: u64,
}

/// The counter files, opened inside the namespace, before its baseline is taken.
pub struct TraceFiles(Vec<File>);

const SOCKSTAT: usize = 0;

impl TraceFiles {
    /// Open the counter files of the calling thread's network namespace.
    pub fn open_here() -> std::io::Result<Self> {
        let mut files = vec![
            File::open("/proc/thread-self/net/sockstat")?,
            File::open("/proc/thread-self/net/snmp")?,
            File::open("/proc/thread-self/net/netstat")?,
        ];
        // Absent when the kernel has no IPv6. Flow labels outlive their sockets.
        for name in ["snmp6", "ip6_flowlabel"] {
            if let Ok(f) = File::open(format!("/proc/thread-self/net/{name}")) {
                files.push(f);
            }
        }
        Ok(Self(files))
    }

    /// The namespace as it is now (made and plumbed, before any run).
    pub fn baseline(self) -> std::io::Result<Traces> {
        let made = read(&self.0)?;
        Ok(Traces {
            files: self.0,
            made,
        })
    }
}

impl Traces {
    /// Whether the namespace is as it was made. Call once every process of the run is
    /// gone; an unreadable file counts as a trace.
    pub fn none_left(&self) -> bool {
        read(&self.files).is_ok_and(|now| now == self.made)
    }
}

fn read(files: &[File]) -> std::io::Result<Reading> {
    let mut texts = Vec::with_capacity(files.len());
    for mut f in files {
        f.rewind()?;
        let mut text = String::new();
        f.read_to_string(&mut text)?;
        texts.push(text);
    }
    let (sockets, time_wait) = sockstat(&texts[SOCKSTAT]);
    Ok(Reading {
        counters: texts[SOCKSTAT + 1..].concat(),
        sockets,
        time_wait,
    })
}

/// `sockets: used` and the TCP line's `tw` (other fields there, such as `orphan` and
/// `mem`, are host-wide and move with other namespaces' traffic).
fn sockstat(text: &str) -> (u64, u64) {
    let field = |line_prefix: &str, name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                words
                    .iter()
                    .position(|w| *w == name)
                    .and_then(|i| words.get(i + 1))
                    .and_then(|v| v.parse().ok())
            })
            // Unparsable: a value no baseline has, so the namespace is not reused.
            .unwrap_or(u64::MAX)
    };
    (field("sockets:", "used"), field("TCP:", "tw"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockstat_fields_are_read_by_name() {
        let text =
            "sockets: used 23\nTCP: inuse 1 orphan 0 tw 4 alloc 1 mem 167\nUDP: inuse 0 mem 0\n";
        assert_eq!(sockstat(text), (23, 4));
    }

    #[test]
    fn an_unreadable_sockstat_never_matches_a_real_one() {
        assert_eq!(sockstat("garbage"), (u64::MAX, u64::MAX));
    }

    #[test]
    fn a_socket_is_a_trace_until_it_is_closed() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!(
                "skipping a_socket_is_a_trace_until_it_is_closed: needs root (a network namespace of its own)"
            );
            return;
        }
        // In a namespace of its own, so no other test's sockets count.
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET): run the tests as root");
            let traces = TraceFiles::open_here()
                .and_then(TraceFiles::baseline)
                .expect("the namespace's counter files");
            assert!(traces.none_left());
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
            assert!(!traces.none_left(), "an open socket is a trace");
            drop(socket);
            assert!(traces.none_left(), "a closed UDP socket leaves nothing");
            let (a, _b) = std::os::unix::net::UnixDatagram::pair().expect("socketpair");
            assert!(!traces.none_left(), "a unix socket is a trace");
            drop(a);
        })
        .join()
        .expect("the test thread");
    }
}
