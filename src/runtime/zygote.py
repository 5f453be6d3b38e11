# The Python fork server ("zygote"). One long-lived interpreter that has already imported
# what Dify's payloads use, and forks once per run. It never runs snippet code: it reads
# requests from the server on fd 3 and forks; the fork's child (the "keeper", still root)
# carries out the owner's steps of the run's jail (its cgroup, its pid namespace) and
# forks the run itself, which carries out the run's steps (namespaces, its own root, uid,
# rlimits, no_new_privs, seccomp) before it reads one byte of the snippet. The steps come
# from the server, the same a helper's run carries out; the executor below (jail.py)
# decides nothing. The keeper waits for the run and reports how it ended.
#
# Started by `sandbox __zygote` inside a private root (read-only binds of the interpreter's
# files, the cgroup directories writable at their own paths), as root, with -I -S -B -u.
# _sitebuiltins: imported here once for every run (see frame.py).
import _sitebuiltins, gc, json, os, resource, select, socket, struct, sys

CONTROL = 3

__FRAME__

__JAIL__


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
        if isinstance(e, KeyboardInterrupt):
            # As python3 ends on an uncaught KeyboardInterrupt: killed by SIGINT (130).
            import signal
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:
                    pass
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
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


def read_all(fd):
    """Everything written to the pipe `fd` until its writers are gone."""
    data = b""
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return data
        data += chunk


def keeper(req, fds, real, sys_path):
    """The run's keeper: the owner's steps of the jail, then the run, then its report."""
    report = fds[3]
    jail = req["jail"]
    try:
        # No parent-death signal: a run outlives a fork server that is replaced while it
        # runs (its keeper reports to the server directly).
        os.setsid()
        execute(jail["owner"], real, {})
        read_err, write_err = os.pipe2(os.O_CLOEXEC)
        # The run's init says here how the run's own process ended.
        read_status, write_status = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
    except BaseException as e:
        tell(report, {"setup_failed": {"message": str(e)}})
        os._exit(126)
    if pid == 0:
        os.close(read_err)
        os.close(read_status)
        # The order the server sends them in.
        roles = {"stdout": fds[0], "stderr": fds[1], "code": fds[2], "stdin": fds[4],
                 "error": write_err, "status": write_status}
        if len(fds) > 5:
            roles["netns"] = fds[5]
        try:
            execute(jail["run"], real, roles)
        except BaseException as e:
            try:
                os.write(roles.get("error", write_err), (str(e) or type(e).__name__).encode())
            finally:
                os._exit(126)
        run_snippet(sys_path)
    os.close(write_err)
    os.close(write_status)
    for fd in fds[:3] + fds[4:]:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    failure = read_all(read_err)
    kind, _, n = read_all(read_status).decode(errors="replace").partition(" ")
    if failure:
        out = {"setup_failed": {"message": failure.decode(errors="replace")}}
    elif kind in ("exited", "signaled") and n.isdigit():
        # The init's word on the run's own process (see jail.py's fork_init).
        out = {"exited": {"code": int(n)}} if kind == "exited" else {"signaled": {"signal": int(n)}}
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
    # Forking is sound only from a single thread: a module that started one disqualifies
    # this fork server.
    if not single_threaded():
        send_message(control, {"refused": "a preloaded module started a thread"})
        return
    # The system calls of every run's jail, set up once.
    real = RealSys()
    # Everything made so far is moved out of the collector's reach: a collection in a
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
            keeper(req, fds, real, config["sys_path"])
        for fd in fds:
            os.close(fd)
        send_message(control, {"pid": pid})


main()
