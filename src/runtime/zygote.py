# The Python fork server ("zygote"). One long-lived interpreter that has already imported
# what Dify's payloads use, and forks once per run. It never runs snippet code: it reads
# requests from the server on fd 3 and forks; the fork's child (the "keeper", still root)
# puts itself in the run's cgroup and namespaces and forks the run itself, which jails
# itself (mounts, uid, rlimits, no_new_privs, seccomp) before it reads one byte of the
# snippet. The keeper waits for the run and reports how it ended.
#
# Started by `sandbox __zygote` inside a private root (read-only binds of the interpreter's
# files, the cgroup directories under /sandbox-cgroup), as root, with -I -S -B -u.
import ctypes, gc, json, os, resource, select, socket, struct, sys

CONTROL = 3

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 38, 22
SECCOMP_MODE_FILTER = 2

__FRAME__


class SetupError(Exception):
    """A jail step that failed: (step, what, errno text)."""


def check(ret, step, what):
    if ret != 0:
        e = ctypes.get_errno()
        raise SetupError("%s failed on %s: %s" % (step, what, os.strerror(e)))


def mount(source, target, fstype, flags, data, step):
    check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                     flags, data and data.encode()), step, target)


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def recv_message(sock):
    """A request: u32 length (little-endian) then JSON, with descriptors alongside."""
    head, fds, _, _ = socket.recv_fds(sock, 4, 8)
    if not head:
        raise EOFError
    head += recv_exact(sock, 4 - len(head))
    (n,) = struct.unpack("<I", head)
    return json.loads(recv_exact(sock, n)), fds


def send_message(sock, obj):
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack("<I", len(data)) + data)


def single_threaded():
    return len(os.listdir("/proc/self/task")) == 1


def reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def mask_proc(masked_files, masked_dirs):
    for name in masked_files:
        p = "/proc/" + name
        if os.path.exists(p):
            mount("/dev/null", p, None, MS_BIND, None, "mounting /proc")
    for name in masked_dirs:
        p = "/proc/" + name
        if os.path.isdir(p):
            mount("tmpfs", p, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=0",
                  "mounting /proc")


# Where the run's process keeps its setup-error pipe until the snippet starts: above the
# descriptors it hands to the snippet (0 to 3), below those it closes.
ERROR_FD = 4


def private_tmp(req):
    """A fresh, size-limited /tmp. What the root binds below /tmp (an interpreter or a
    state directory living there) is bound again into it before it takes /tmp's place."""
    staging = "/sandbox-tmp"
    mount("tmpfs", staging, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          "size=%d,mode=1777,nr_inodes=16384" % req["tmp_bytes"], "mounting the private /tmp")
    for link, target in req["tmp_symlinks"]:
        at = staging + link[len("/tmp"):]
        os.makedirs(os.path.dirname(at), exist_ok=True)
        os.symlink(target, at)
    for path in req["tmp_binds"]:
        at = staging + path[len("/tmp"):]
        os.makedirs(os.path.dirname(at), exist_ok=True)
        if os.path.isdir(path):
            os.makedirs(at, exist_ok=True)
        else:
            open(at, "w").close()
        mount(path, at, None, MS_BIND | MS_REC, None, "mounting the private /tmp")
        mount(None, at, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None,
              "mounting the private /tmp")
    os.chmod(staging, 0o1777)
    mount(staging, "/tmp", None, MS_MOVE, None, "mounting the private /tmp")


def become_run(req, filters, fds, errors):
    """In the run's own process (pid 1 of its pid namespace): jail, then the snippet."""
    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    mount(None, "/", None, MS_REC | MS_PRIVATE, None, "making mounts private")
    # The cgroup directories were only needed to join the run's cgroup.
    for name in os.listdir("/sandbox-cgroup"):
        path = "/sandbox-cgroup/" + name
        check(libc.umount2(path.encode(), MNT_DETACH), "hiding the cgroups", path)
    private_tmp(req)
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, None,
          "mounting /proc")
    mask_proc(req["masked_proc_files"], req["masked_proc_dirs"])
    # The run's own files (passwd with its uid, resolv.conf with its gateway): written on a
    # staging tmpfs, bound read-only over their places, the staging then let go.
    if req["root_files"]:
        mount("tmpfs", "/sandbox-files", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k",
              "building the sandbox root")
        for i, (path, text) in enumerate(req["root_files"]):
            staged = "/sandbox-files/%d" % i
            with open(staged, "w") as f:
                f.write(text)
            mount(staged, path, None, MS_BIND, None, "building the sandbox root")
            mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV,
                  None, "building the sandbox root")
        check(libc.umount2(b"/sandbox-files", MNT_DETACH), "building the sandbox root",
              "/sandbox-files")
    socket.sethostname("sandbox")

    stdout, stderr, code, stdin = fds[0], fds[1], fds[2], fds[4]
    os.dup2(stdin, 0)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    os.dup2(code, 3)
    errors[0] = os.dup2(errors[0], ERROR_FD, inheritable=False)
    os.closerange(ERROR_FD + 1, 65536)

    for name, value in req["rlimits"]:
        resource.setrlimit(getattr(resource, name), (value, value))
    os.chdir(req["workdir"])
    uid = req["uid"]
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    # Changing credentials clears the parent-death signal: set it again.
    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "setting no_new_privs", "prctl")
    prog = filters[req["filter"]]
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0),
          "installing the seccomp filter", "filter")

    os.environ.clear()
    os.environ.update(dict(kv.split("=", 1) for kv in req["env"]))
    # Jailed: from here on a failure is the snippet's own.
    os.close(errors[0])


def run_snippet(sys_path):
    """The snippet, as a fresh interpreter would run it: a traceback of its own frames and
    exit code 1 on an exception, then the shutdown steps a snippet can observe."""
    import types
    sys.path[:] = sys_path
    data = open(3, "rb", closefd=False).read()
    # Tells the server the snippet arrived whole; nothing of it has run yet.
    os.write(3, b"__ACK__")
    # Kept for the announcement of the run's end (see `shut_down`), on the highest
    # descriptor the run may have: fd 3 is free again, as in a fresh interpreter.
    end = os.dup2(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1, inheritable=False)
    os.close(3)
    preload, code, filename, argv, env = _frame(data)
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    g = main.__dict__
    filename = _invoke(filename, argv, env, g)
    del data
    try:
        if preload:
            exec(compile(preload, "<preload>", "exec"), g)
        exec(compile(code, filename, "exec"), g)
    except SystemExit as e:
        shut_down(exit_code(e), end)
    except BaseException as e:
        import traceback
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        shut_down(1, end)
    shut_down(0, end)


def exit_code(e):
    """The status `sys.exit(x)` gives a fresh interpreter."""
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def shut_down(code, end):
    """What a fresh interpreter's shutdown does that a snippet can see: join its threads,
    run its atexit handlers, flush its output. Tearing down every preloaded module is
    skipped: it costs tens of milliseconds and nothing of it reaches the answer."""
    try:
        sys.modules["threading"]._shutdown()
    except BaseException:
        pass
    import atexit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    # The output is complete: close it and say how the run ends, so the server answers
    # now rather than after this process's teardown (about 2 ms for a forked interpreter).
    for fd in (1, 2):
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        os.write(end, b"__ENDED__%d" % code)
        os.close(end)
    except OSError:
        pass
    os._exit(code)


def tell(report, message):
    """Report to the server; one that is gone (killed, say) no longer listens."""
    try:
        os.write(report, json.dumps(message).encode())
    except OSError:
        pass


def keeper(req, filters, fds):
    """The run's keeper: joins the cgroup and namespaces, forks the run, reports its end."""
    report = fds[3]
    try:
        # No parent-death signal: a run outlives a fork server that is replaced while it
        # runs (its keeper reports to the server directly).
        os.setsid()
        for procs in req["cgroup_procs"]:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
        if req["network"] == "offline":
            flags |= CLONE_NEWNET
        check(libc.unshare(flags), "creating namespaces", hex(flags))
        if req["network"] == "own":
            check(libc.setns(fds[5], CLONE_NEWNET), "joining the run's network namespace", "setns")
        read_err, write_err = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
    except BaseException as e:
        tell(report, {"setup_failed": {"message": str(e)}})
        os._exit(126)
    if pid == 0:
        os.close(read_err)
        errors = [write_err]
        try:
            become_run(req, filters, fds, errors)
        except BaseException as e:
            try:
                os.write(errors[0], (str(e) or type(e).__name__).encode())
            finally:
                os._exit(126)
        run_snippet(req["sys_path"])
    os.close(write_err)
    for fd in fds[:3] + fds[4:]:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    failure = b""
    while True:
        chunk = os.read(read_err, 4096)
        if not chunk:
            break
        failure += chunk
    if failure:
        out = {"setup_failed": {"message": failure.decode(errors="replace")}}
    elif os.WIFSIGNALED(status):
        out = {"signaled": {"signal": os.WTERMSIG(status)}}
    else:
        out = {"exited": {"code": os.WEXITSTATUS(status)}}
    tell(report, out)
    os._exit(0)


def main():
    control = socket.socket(fileno=CONTROL)
    config, _ = recv_message(control)
    sys.path[:] = config["sys_path"]
    for name in config["preload"]:
        try:
            __import__(name)
        except ImportError as e:
            print("sandbox fork server: cannot preload %s: %s" % (name, e), file=sys.stderr)
    # Warm the template compiler Dify's template node uses.
    if "jinja2" in sys.modules:
        sys.modules["jinja2"].Template("{{ s }}").render(s="a")
    filters = {k: bytes.fromhex(v) for k, v in config["filters"].items()}
    # Forking is sound only from a single thread: a module that started one disqualifies
    # this fork server.
    if not single_threaded():
        send_message(control, {"refused": "a preloaded module started a thread"})
        return
    # Everything imported so far is moved out of the collector's reach: a collection in a
    # child would otherwise write to every object's header and copy every page of the
    # heap the child shares with this process.
    gc.collect()
    gc.freeze()
    send_message(control, {"ready": True, "pid": os.getpid()})
    while True:
        reap()
        # Wake up now and then to reap keepers even while no request comes.
        readable, _, _ = select.select([control], [], [], 1.0)
        if not readable:
            continue
        try:
            req, fds = recv_message(control)
        except EOFError:
            return
        if not single_threaded():
            for fd in fds:
                os.close(fd)
            send_message(control, {"refused": "the fork server is no longer single-threaded"})
            return
        pid = os.fork()
        if pid == 0:
            control.close()
            keeper(req, filters, fds)
        for fd in fds:
            os.close(fd)
        send_message(control, {"pid": pid})


main()
