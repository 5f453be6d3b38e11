# The executor of a jail's steps in the fork server: the twin of the Rust executor
# (src/isolation/jail/exec.rs), step for step and call for call. It decides nothing:
# every path, flag, limit and id comes in the steps from the server. `RealSys` makes the
# calls through ctypes; a test swaps in a recorder and compares its calls with the Rust
# executor's for the same steps.
import ctypes, fcntl, os, resource, shutil, signal, stat


# pivot_root(2)'s number: the one call here libc has no wrapper for.
_SYS_PIVOT_ROOT = 155 if os.uname().machine == "x86_64" else 41


class _SockFprog(ctypes.Structure):
    """struct sock_fprog: a seccomp program's length in instructions and its address."""
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class SetupError(Exception):
    """A step that failed: "<step> failed on <what>: <cause>", as the helper words it."""


def _fail(step, what, err):
    return SetupError("%s failed on %s: %s" % (step, what, os.strerror(err)))


class RealSys:
    def __init__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                    ctypes.c_ulong, ctypes.c_char_p]
        self.libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self.libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                                    ctypes.c_ulong, ctypes.c_ulong]
        self.libc.syscall.restype = ctypes.c_long

    def _check(self, ret):
        if ret != 0:
            raise OSError(ctypes.get_errno(), "")

    def join_cgroup(self, procs):
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    def unshare(self, flags):
        self._check(self.libc.unshare(flags))

    def setns(self, fd, nstype):
        self._check(self.libc.setns(fd, nstype))

    def set_pdeathsig(self, signal):
        self._check(self.libc.prctl(1, signal, 0, 0, 0))  # PR_SET_PDEATHSIG

    def umask(self, mask):
        os.umask(mask)

    def setsid(self):
        os.setsid()

    def sethostname(self, name):
        data = name.encode()
        self._check(self.libc.sethostname(data, len(data)))

    def mount(self, source, target, fstype, flags, data):
        enc = lambda s: None if s is None else s.encode()
        self._check(self.libc.mount(enc(source), target.encode(), enc(fstype), flags, enc(data)))

    def mount_setattr(self, target, flags, attr_set):
        # struct mount_attr: attr_set, attr_clr, propagation, userns_fd.
        attr = (ctypes.c_uint64 * 4)(attr_set, 0, 0, 0)
        # mount_setattr: 442 on every architecture; AT_FDCWD.
        self._check(self.libc.syscall(442, ctypes.c_int(-100), target.encode(),
                                      ctypes.c_uint(flags), attr, ctypes.c_size_t(32)))

    def umount2(self, target, flags):
        self._check(self.libc.umount2(target.encode(), flags))

    def kind(self, path):
        try:
            st = os.stat(path)
        except OSError:
            return "missing"
        return "dir" if stat.S_ISDIR(st.st_mode) else "other"

    def entry_exists(self, path):
        return os.path.lexists(path)

    def mkdir_all(self, path):
        os.makedirs(path, 0o755, exist_ok=True)

    def create_file(self, path):
        open(path, "w").close()

    def symlink(self, target, path):
        os.symlink(target, path)

    def write_file(self, path, contents):
        with open(path, "w") as f:
            f.write(contents)

    def chmod(self, path, mode):
        os.chmod(path, mode)

    def chown(self, path, uid, gid):
        os.chown(path, uid, gid)

    def remove_all(self, path):
        shutil.rmtree(path, ignore_errors=True)

    def mkdir(self, path):
        os.mkdir(path)

    def chdir(self, path):
        os.chdir(path)

    def pivot_root_here(self):
        self._check(self.libc.syscall(_SYS_PIVOT_ROOT, b".", b"."))

    def chroot(self, path):
        os.chroot(path)

    def open_read(self, path):
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def dup_above(self, fd, base):
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base)

    def dup_to(self, fd, target, cloexec):
        os.dup2(fd, target, inheritable=not cloexec)

    def close_range(self, first, last):
        self._check(self.libc.syscall(436, first, last, 0))  # close_range, on every arch

    def close(self, fd):
        try:
            os.close(fd)
        except OSError:
            pass

    def setrlimit(self, res, value):
        resource.setrlimit(res, (value, value))

    def clear_groups(self):
        os.setgroups([])

    def setresgid(self, gid):
        os.setresgid(gid, gid, gid)

    def setresuid(self, uid):
        os.setresuid(uid, uid, uid)

    def no_new_privs(self):
        self._check(self.libc.prctl(38, 1, 0, 0, 0))  # PR_SET_NO_NEW_PRIVS

    def fork_init(self, status):
        pid = os.fork()
        if pid == 0:
            return
        # The run's init (isolation/init.rs does the same for a helper's run). It imports
        # nothing here: a root process reading modules from the run's root would run them.
        if status > 0:
            self.close_range(0, status - 1)
        self.close_range(status + 1, 2147483647)
        every = signal.valid_signals()
        signal.pthread_sigmask(signal.SIG_BLOCK, every)
        while True:
            while True:
                try:
                    p, st = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    os._exit(0)
                except InterruptedError:
                    continue
                if p == 0:
                    break
                if p == pid:
                    if os.WIFEXITED(st):
                        line = "exited %d" % os.WEXITSTATUS(st)
                    else:
                        line = "signaled %d" % os.WTERMSIG(st)
                    try:
                        os.write(status, line.encode())
                    except OSError:
                        pass
                    os._exit(0)
            sig = signal.sigwaitinfo(every).si_signo
            if sig != signal.SIGCHLD:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass

    def set_dumpable(self):
        self._check(self.libc.prctl(4, 1, 0, 0, 0))  # PR_SET_DUMPABLE

    def seccomp(self, program):
        buf = ctypes.create_string_buffer(program, len(program))
        fprog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
        # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        self._check(self.libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0))

    def start(self, env, error):
        os.environ.clear()
        os.environ.update(dict(kv.split("=", 1) for kv in env))
        # Jailed: from here on a failure is the snippet's own.
        os.close(error)


def _errno(e):
    return e.errno if isinstance(e, OSError) and e.errno else 5  # EIO


def _parents(sys, path, step):
    parent = os.path.dirname(path)
    if parent:
        try:
            sys.mkdir_all(parent)
        except OSError as e:
            raise _fail(step, parent, _errno(e))


def execute(ops, sys, fds):
    """Carry out `ops` in order. `fds` maps descriptor roles ("stdin", "code", ...) to
    numbers; the steps update it. A failure raises SetupError."""
    for op in ops:
        _one(op, sys, fds)


def _call(step, what, f, *args):
    try:
        return f(*args)
    except OSError as e:
        raise _fail(step, what, _errno(e))


def _fd(fds, role, step):
    if role not in fds:
        raise SetupError("%s failed on %s: descriptor not received" % (step, role))
    return fds[role]


def _mount_step(fstype):
    return {"proc": "mounting /proc", "tmpfs": "building the sandbox root"}.get(
        fstype, "bind-mounting into the sandbox root")


def _one(op, sys, fds):
    kind = op["op"]
    if kind == "join_cgroup":
        _call("joining the run's cgroup", op["procs"], sys.join_cgroup, op["procs"])
    elif kind == "unshare":
        _call("creating namespaces", "flags %#x" % op["flags"], sys.unshare, op["flags"])
    elif kind == "join_network":
        fd = _fd(fds, "netns", "joining the run's network namespace")
        _call("joining the run's network namespace", "setns", sys.setns, fd, op["nstype"])
        sys.close(fd)
        del fds["netns"]
    elif kind == "parent_death_signal":
        _call("arranging file descriptors", "pdeathsig", sys.set_pdeathsig, op["signal"])
    elif kind == "umask":
        sys.umask(op["mask"])
    elif kind == "new_session":
        _call("arranging file descriptors", "setsid", sys.setsid)
    elif kind == "hostname":
        _call("setting the hostname", op["name"], sys.sethostname, op["name"])
    elif kind == "mount":
        _call(_mount_step(op["fstype"]), op["target"], sys.mount, op["source"], op["target"],
              op["fstype"], op["flags"], op["data"])
    elif kind == "read_only_tree":
        _call("bind-mounting into the sandbox root", op["target"], sys.mount_setattr,
              op["target"], op["flags"], op["attr_set"])
    elif kind == "if_exists":
        if sys.kind(op["path"]) != "missing":
            execute(op["then"], sys, fds)
    elif kind == "make_dir":
        _call("building the sandbox root", op["path"], sys.mkdir_all, op["path"])
    elif kind == "make_mount_point":
        what = sys.kind(op["like"])
        if what == "missing":
            raise SetupError("bind-mounting into the sandbox root failed on %s: "
                             "no such file or directory" % op["like"])
        if what == "dir":
            _call("building the sandbox root", op["path"], sys.mkdir_all, op["path"])
        else:
            _parents(sys, op["path"], "building the sandbox root")
            _call("building the sandbox root", op["path"], sys.create_file, op["path"])
    elif kind == "symlink":
        _parents(sys, op["path"], "building the sandbox root")
        if not sys.entry_exists(op["path"]):
            _call("building the sandbox root", op["path"], sys.symlink, op["target"], op["path"])
    elif kind == "write_file":
        _parents(sys, op["path"], "building the sandbox root")
        _call("building the sandbox root", op["path"], sys.write_file, op["path"],
              op["contents"])
    elif kind == "chmod":
        _call("building the sandbox root", op["path"], sys.chmod, op["path"], op["mode"])
    elif kind == "pivot_root":
        step = "switching to the sandbox root (pivot_root)"
        _call(step, op["new_root"], sys.chdir, op["new_root"])
        _call(step, op["new_root"], sys.pivot_root_here)
        _call(step, "the old root", sys.umount2, ".", op["detach"])
        _call(step, "/", sys.chdir, "/")
    elif kind == "descriptors":
        _arrange(sys, fds, op["keep"], op["park"])
    elif kind == "rlimit":
        _call("setting resource limits", op["name"], sys.setrlimit, op["resource"], op["value"])
    elif kind == "clear_groups":
        _call("switching to the sandbox uid", "setgroups", sys.clear_groups)
    elif kind == "set_gid":
        _call("switching to the sandbox uid", "gid %d" % op["gid"], sys.setresgid, op["gid"])
    elif kind == "set_uid":
        _call("switching to the sandbox uid", "uid %d" % op["uid"], sys.setresuid, op["uid"])
    elif kind == "chdir":
        _call("arranging file descriptors", op["path"], sys.chdir, op["path"])
    elif kind == "init":
        status = _fd(fds, "status", "forking the sandboxed process")
        _call("forking the sandboxed process", "the run's init", sys.fork_init, status)
        sys.close(status)
        del fds["status"]
    elif kind == "dumpable":
        _call("switching to the sandbox uid", "PR_SET_DUMPABLE", sys.set_dumpable)
    elif kind == "no_new_privs":
        _call("setting no_new_privs", "prctl", sys.no_new_privs)
    elif kind == "seccomp":
        _call("installing the seccomp filter", "filter", sys.seccomp,
              bytes.fromhex(op["program"]))
    elif kind == "start":
        sys.start(op["env"], _fd(fds, "error", "starting the interpreter"))
    else:
        # Steps only a helper carries out (a user namespace, exec, ...): the server never
        # sends them here.
        raise SetupError("the fork server cannot carry out the step %r" % kind)


def _arrange(sys, fds, keep, park):
    step = "arranging file descriptors"
    parked = []
    for k in keep:
        fd = _fd(fds, k["fd"], step)
        parked.append(_call(step, "parking", sys.dup_above, fd, park))
    # The table follows the descriptors, so a failure below is still reported.
    fds.clear()
    for k, p in zip(keep, parked):
        fds[k["fd"]] = p
    nxt = 0
    for p in sorted(parked):
        if p > nxt:
            _call(step, "close_range", sys.close_range, nxt, p - 1)
        nxt = p + 1
    _call(step, "close_range", sys.close_range, nxt, 2147483647)
    for k, p in zip(keep, parked):
        _call(step, "dup3", sys.dup_to, p, k["at"], k["cloexec"])
        sys.close(p)
        fds[k["fd"]] = k["at"]
