# What a run can observe of its jail, printed as one JSON object (see
# tests/jail_equivalence.rs, which compares it across every way a run is started).
# Every reading is taken on its own: one the jail forbids is reported as "error: ...",
# which is itself part of what the run observes. The probe then keeps a file named
# TOKEN open in its working directory, so the test can find its process from outside,
# and waits until the test has looked and written to it.
import json, os, resource, socket, stat, sys, time

TOKEN = "__TOKEN__"
MASKED = __MASKED__
report = {}


def take(name, f):
    try:
        report[name] = f()
    except BaseException as e:
        report[name] = "error: %s" % (type(e).__name__ if not isinstance(e, OSError) else
                                      "errno %d" % e.errno)


def read(path):
    with open(path) as f:
        return f.read()


def status():
    keep = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
            "NoNewPrivs", "Seccomp", "Seccomp_filters", "SigBlk", "SigIgn", "SigCgt", "NSpid")
    out = {}
    for line in read("/proc/self/status").splitlines():
        k, _, v = line.partition(":")
        if k in keep:
            out[k] = " ".join(v.split())
    return out


# Linux's numbering (the resource module lacks some names, RLIMIT_LOCKS among them).
RLIMITS = ["cpu", "fsize", "data", "stack", "core", "rss", "nproc", "nofile", "memlock", "as",
           "locks", "sigpending", "msgqueue", "nice", "rtprio", "rttime"]


def rlimits():
    def show(v):
        return "unlimited" if v == resource.RLIM_INFINITY else str(v)
    out = {}
    for r, name in enumerate(RLIMITS):
        soft, hard = resource.getrlimit(r)
        out[name] = show(soft) + " " + show(hard)
    return out


def mounts():
    # mount point, fs type and the flags that matter; ids and sources are the host's.
    out = []
    for line in read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        f = left.split()
        fstype = right.split()[0]
        flags = [o for o in f[5].split(",") if o in ("ro", "rw", "nosuid", "nodev", "noexec")]
        out.append("%s %s %s" % (f[4], fstype, ",".join(flags)))
    return out


def namespaces():
    return {n: os.readlink("/proc/self/ns/" + n) for n in sorted(os.listdir("/proc/self/ns"))}


def masked():
    out = {}
    for name in MASKED:
        p = "/proc/" + name
        try:
            st = os.lstat(p)
        except OSError as e:
            out[name] = "absent" if e.errno == 2 else "errno %d" % e.errno
            continue
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3):
            out[name] = "null device"
        elif stat.S_ISDIR(st.st_mode):
            try:
                out[name] = "empty dir" if not os.listdir(p) else "listable dir"
            except OSError as e:
                out[name] = "dir, errno %d" % e.errno
        else:
            out[name] = "exposed"
    return out


def fd_kind(target):
    for kind in ("pipe:", "socket:"):
        if target.startswith(kind):
            return kind[:-1]
    if target.startswith("anon_inode:"):
        return target.split("]")[0] + "]" if "[" in target else target
    return target


def descriptors():
    out = {}
    for n in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink("/proc/self/fd/" + n)
        except OSError:
            continue  # the listing's own descriptor, closed by now
        if target.startswith("/proc/") and target.endswith("/fd"):
            continue  # the listing's own descriptor
        flags = "?"
        try:
            for line in read("/proc/self/fdinfo/" + n).splitlines():
                if line.startswith("flags:"):
                    v = int(line.split()[1], 8)
                    flags = ("r", "w", "rw", "?")[v & 3] + (",cloexec" if v & 0o2000000 else "")
        except OSError:
            pass
        out[n] = fd_kind(target) + " " + flags
    return out


def umask():
    old = os.umask(0o22)
    os.umask(old)
    return "%04o" % old


def passwd():
    text = read("/etc/passwd")
    names = sorted(l.split(":")[0] for l in text.splitlines() if l.strip())
    own = [l.split(":")[0] for l in text.splitlines() if l.split(":")[2:3] == [str(os.getuid())]]
    return {"entries": names, "own uid named": own}


def resolv():
    return [l for l in read("/etc/resolv.conf").splitlines() if l.strip() and not l.startswith("#")]


def proc_self():
    link = os.readlink("/proc/self")
    # Root's when the process is not dumpable: its private /proc files (ns, environ,
    # fd, ...) are then closed to it. (/proc/self itself is always its euid's.)
    owner = os.stat("/proc/self/environ").st_uid
    return {"pid": os.getpid(), "/proc/self": link, "is own": link == str(os.getpid()),
            "owner": "the run's uid" if owner == os.getuid() else "uid %d" % owner}


take("ids", lambda: {"res uid": list(os.getresuid()), "res gid": list(os.getresgid()),
                     "groups": sorted(os.getgroups())})
take("status", status)
take("rlimits", rlimits)
take("mounts", mounts)
take("ns", namespaces)
take("cgroup", lambda: read("/proc/self/cgroup").splitlines())
take("masked", masked)
take("env", lambda: dict(os.environ))
take("cwd", os.getcwd)
take("umask", umask)
take("fds", descriptors)
take("hostname", socket.gethostname)
take("passwd", passwd)
take("resolv.conf", resolv)
take("proc self", proc_self)
take("proc pids", lambda: sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
take("root", lambda: sorted(os.listdir("/")))
take("uid_map", lambda: read("/proc/self/uid_map").split())
# The environment the process was started with, which a run can read back.
take("environ", lambda: dict(e.split("=", 1) if "=" in e else (e, "")
                             for e in read("/proc/self/environ").split("\0") if e))

print(json.dumps(report))
sys.stdout.flush()

marker = open(TOKEN, "w")
deadline = time.monotonic() + 20
while os.fstat(marker.fileno()).st_size == 0 and time.monotonic() < deadline:
    time.sleep(0.01)
