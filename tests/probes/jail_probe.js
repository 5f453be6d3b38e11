// The Node twin of jail_probe.py: the same readings under the same names, printed as one
// JSON object; then a file named TOKEN is kept open in the working directory until the
// test has looked at the process from outside and written to it.
const fs = require('fs');
const os = require('os');

const TOKEN = '__TOKEN__';
const MASKED = __MASKED__;
const report = {};

function take(name, f) {
  try {
    report[name] = f();
  } catch (e) {
    report[name] = 'error: ' + (typeof e.errno === 'number' ? 'errno ' + -e.errno : e.name);
  }
}

const read = (path) => fs.readFileSync(path, 'utf8');
const lines = (text) => text.split('\n').filter((l) => l.length > 0);

function status() {
  const keep = ['Uid', 'Gid', 'Groups', 'CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb',
    'NoNewPrivs', 'Seccomp', 'Seccomp_filters', 'SigBlk', 'SigIgn', 'SigCgt', 'NSpid'];
  const out = {};
  for (const line of lines(read('/proc/self/status'))) {
    const i = line.indexOf(':');
    const k = line.slice(0, i);
    if (keep.includes(k)) out[k] = line.slice(i + 1).trim().split(/\s+/).join(' ');
  }
  return out;
}

// /proc/self/limits' rows, under the names the Python probe gives them.
const RLIMITS = {
  'Max cpu time': 'cpu', 'Max file size': 'fsize', 'Max data size': 'data',
  'Max stack size': 'stack', 'Max core file size': 'core', 'Max resident set': 'rss',
  'Max processes': 'nproc', 'Max open files': 'nofile', 'Max locked memory': 'memlock',
  'Max address space': 'as', 'Max file locks': 'locks', 'Max pending signals': 'sigpending',
  'Max msgqueue size': 'msgqueue', 'Max nice priority': 'nice',
  'Max realtime priority': 'rtprio', 'Max realtime timeout': 'rttime',
};

function rlimits() {
  const out = {};
  for (const line of lines(read('/proc/self/limits')).slice(1)) {
    const name = line.slice(0, 26).trim();
    const [soft, hard] = line.slice(26).trim().split(/\s+/);
    if (RLIMITS[name]) out[RLIMITS[name]] = soft + ' ' + hard;
  }
  return out;
}

function mounts() {
  const flags = ['ro', 'rw', 'nosuid', 'nodev', 'noexec'];
  return lines(read('/proc/self/mountinfo')).map((line) => {
    const [left, right] = line.split(' - ');
    const f = left.split(' ');
    const kept = f[5].split(',').filter((o) => flags.includes(o));
    return f[4] + ' ' + right.split(' ')[0] + ' ' + kept.join(',');
  });
}

function namespaces() {
  const out = {};
  for (const n of fs.readdirSync('/proc/self/ns').sort()) {
    out[n] = fs.readlinkSync('/proc/self/ns/' + n);
  }
  return out;
}

function masked() {
  const out = {};
  for (const name of MASKED) {
    const p = '/proc/' + name;
    let st;
    try {
      st = fs.lstatSync(p);
    } catch (e) {
      out[name] = e.code === 'ENOENT' ? 'absent' : 'errno ' + -e.errno;
      continue;
    }
    if (st.isCharacterDevice() && st.rdev === 259) {
      out[name] = 'null device';
    } else if (st.isDirectory()) {
      try {
        out[name] = fs.readdirSync(p).length === 0 ? 'empty dir' : 'listable dir';
      } catch (e) {
        out[name] = 'dir, errno ' + -e.errno;
      }
    } else {
      out[name] = 'exposed';
    }
  }
  return out;
}

function fdKind(target) {
  for (const kind of ['pipe', 'socket']) if (target.startsWith(kind + ':')) return kind;
  if (target.startsWith('anon_inode:') && target.includes('[')) return target.split(']')[0] + ']';
  return target;
}

function descriptors() {
  const out = {};
  for (const n of fs.readdirSync('/proc/self/fd')) {
    let target;
    try {
      target = fs.readlinkSync('/proc/self/fd/' + n);
    } catch {
      continue; // the listing's own descriptor, closed by now
    }
    if (target.startsWith('/proc/') && target.endsWith('/fd')) continue;
    let flags = '?';
    try {
      for (const line of lines(read('/proc/self/fdinfo/' + n))) {
        if (line.startsWith('flags:')) {
          const v = parseInt(line.split(/\s+/)[1], 8);
          flags = ['r', 'w', 'rw', '?'][v & 3] + (v & 0o2000000 ? ',cloexec' : '');
        }
      }
    } catch {}
    out[n] = fdKind(target) + ' ' + flags;
  }
  return out;
}

function umask() {
  const old = process.umask(0o22);
  process.umask(old);
  return old.toString(8).padStart(4, '0');
}

function passwd() {
  const rows = lines(read('/etc/passwd')).map((l) => l.split(':'));
  const uid = String(process.getuid());
  return {
    entries: rows.map((r) => r[0]).sort(),
    'own uid named': rows.filter((r) => r[2] === uid).map((r) => r[0]),
  };
}

function procSelf() {
  const link = fs.readlinkSync('/proc/self');
  // Root's when the process is not dumpable: its private /proc files (ns, environ,
  // fd, ...) are then closed to it. (/proc/self itself is always its euid's.)
  const owner = fs.statSync('/proc/self/environ').uid;
  return {
    pid: process.pid,
    '/proc/self': link,
    'is own': link === String(process.pid),
    owner: owner === process.getuid() ? "the run's uid" : 'uid ' + owner,
  };
}

function resUid() {
  // Node has no getresuid: the status line holds real, effective, saved and fs ids.
  const s = status();
  return [s.Uid, s.Gid].map((v) => v.split(' ').slice(0, 3).map(Number));
}

take('ids', () => {
  let res;
  try {
    res = resUid();
  } catch {
    // No /proc (the chroot level): real and effective ids only.
    res = [[process.getuid(), process.geteuid()], [process.getgid(), process.getegid()]];
  }
  // Node's getgroups() adds the effective gid to the supplementary groups; the Python
  // probe's list (getgroups(2) itself) has no such entry.
  const groups = process.getgroups().filter((g) => g !== process.getegid());
  return { 'res uid': res[0], 'res gid': res[1], groups: groups.sort((a, b) => a - b) };
});
take('status', status);
take('rlimits', rlimits);
take('mounts', mounts);
take('ns', namespaces);
take('cgroup', () => lines(read('/proc/self/cgroup')));
take('masked', masked);
take('env', () => ({ ...process.env }));
take('cwd', () => process.cwd());
take('umask', umask);
take('fds', descriptors);
take('hostname', () => os.hostname());
take('passwd', passwd);
take('resolv.conf', () => lines(read('/etc/resolv.conf')).filter((l) => !l.startsWith('#')));
take('proc self', procSelf);
take('proc pids', () => fs.readdirSync('/proc').filter((p) => /^\d+$/.test(p)).map(Number).sort((a, b) => a - b));
take('root', () => fs.readdirSync('/').sort());
take('uid_map', () => read('/proc/self/uid_map').trim().split(/\s+/));
// The environment the process was started with, which a run can read back.
take('environ', () => {
  const out = {};
  for (const e of read('/proc/self/environ').split('\0').filter((x) => x.length > 0)) {
    const i = e.indexOf('=');
    if (i < 0) out[e] = ''; else out[e.slice(0, i)] = e.slice(i + 1);
  }
  return out;
});

fs.writeSync(1, JSON.stringify(report) + '\n');

const marker = fs.openSync(TOKEN, 'w');
const deadline = Date.now() + 20000;
const wait = setInterval(() => {
  if (fs.fstatSync(marker).size > 0 || Date.now() > deadline) {
    clearInterval(wait);
    fs.closeSync(marker);
  }
}, 10);
