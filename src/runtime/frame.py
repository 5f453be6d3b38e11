# The frame on fd 3, taken apart (its description: src/isolation/snippet.rs). Included in
# the Python bootstrap and in the fork server, so both read it the same way. Only bytes
# are split: a run imports nothing for it but `_sitebuiltins` (a few lines of the
# standard library) for the builtins `site` would give.
def _frame(d):
    """(preload, code, filename, argv, env) from the whole frame `d`."""
    h, _, r = d.partition(b"\n")
    p, a, e = map(int, h.split(b" "))
    i, v = 0, []
    while len(v) < 1 + a + e:
        j = r.index(b"\n", i)
        i = j + 1 + int(r[i:j])
        v.append(r[j + 1:i].decode("utf-8", "surrogateescape"))
    return r[i:i + p], r[i + p:], v[0], v[1:1 + a], v[1 + a:]


def _invoke(filename, argv, env, g):
    """What the snippet finds before its first line: its argv, its environment, the
    directory of its script first on sys.path, __file__, and the builtins `site` gives a
    python3 (exit, quit, help, copyright, credits, license) without `site` itself, which
    would read .pth files and user directories. Returns the name to compile the code
    under."""
    import builtins, sys, _sitebuiltins
    eof = "Ctrl-D (i.e. EOF)"
    builtins.exit = _sitebuiltins.Quitter("exit", eof)
    builtins.quit = _sitebuiltins.Quitter("quit", eof)
    builtins.copyright = _sitebuiltins._Printer("copyright", sys.copyright)
    builtins.credits = _sitebuiltins._Printer(
        "credits", "Thanks to CWI, CNRI, BeOpen, Zope Corporation, the Python Software "
        "Foundation, and a cast of thousands for supporting Python development.")
    builtins.license = _sitebuiltins._Printer("license", "See https://www.python.org/psf/license/")
    builtins.help = _sitebuiltins._Helper()
    sys.argv = argv or [""]
    if env:
        import os
        os.environ.update(kv.split("=", 1) for kv in env)
    if filename:
        sys.path.insert(0, filename.rpartition("/")[0])
        if filename.startswith("/"):
            g["__file__"] = filename
    return filename or "<code>"
