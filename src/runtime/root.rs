//! Turns the paths an interpreter needs into a `RootPlan`: each path is mirrored with
//! the host's symlinks recreated (so `/lib64/ld-linux-x86-64.so.2` resolves inside the
//! root as it does outside), and only real files and directories are bind-mounted.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use crate::isolation::spec::RootPlan;

/// Paths that must never be exposed even when asked for (secrets of the host).
const NEVER: &[&str] = &[
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/ssl/private",
    "/root/.ssh",
    "/proc",
    "/sys",
    "/dev",
];

#[derive(Debug, Default)]
pub struct RootBuilder {
    binds: BTreeSet<PathBuf>,
    symlinks: BTreeSet<(PathBuf, PathBuf)>,
}

/// Lexical normalisation (".." pops a component). Sound here because the prefix it
/// applies to has already been resolved component by component.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(x) => out.push(x),
            _ => {}
        }
    }
    out
}

impl RootBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `path` if it exists on the host; returns whether it did.
    pub fn add(&mut self, path: &Path) -> bool {
        self.add_depth(path, 0)
    }

    fn add_depth(&mut self, path: &Path, depth: u32) -> bool {
        if depth > 16 || !path.is_absolute() {
            return false;
        }
        let path = normalize(path);
        if NEVER.iter().any(|n| path.starts_with(n)) {
            return false;
        }
        let mut cur = PathBuf::from("/");
        let parts: Vec<_> = path.components().skip(1).collect();
        for (i, part) in parts.iter().enumerate() {
            let next = cur.join(part);
            let Ok(meta) = std::fs::symlink_metadata(&next) else {
                return false;
            };
            if meta.file_type().is_symlink() {
                let Ok(target) = std::fs::read_link(&next) else {
                    return false;
                };
                self.symlinks.insert((next.clone(), target.clone()));
                let mut resolved = if target.is_absolute() {
                    target
                } else {
                    cur.join(target)
                };
                for rest in &parts[i + 1..] {
                    resolved.push(rest);
                }
                return self.add_depth(&resolved, depth + 1);
            }
            cur = next;
        }
        self.binds.insert(cur);
        true
    }

    /// Keep only the outermost binds, and the symlinks not already visible through one.
    pub fn build(self) -> RootPlan {
        let mut binds: Vec<PathBuf> = Vec::new();
        for b in self.binds {
            if !binds.iter().any(|outer| b.starts_with(outer)) {
                binds.push(b);
            }
        }
        let symlinks = self
            .symlinks
            .into_iter()
            .filter(|(link, _)| !binds.iter().any(|b| link.starts_with(b)))
            .collect();
        RootPlan { binds, symlinks }
    }
}

/// The system files every language root gets (PROTOCOL: libc dir, CA bundle,
/// resolv.conf, hosts, nsswitch, localtime, zoneinfo), when present on this host.
pub const DEFAULT_SYSTEM_FILES: &[&str] = &[
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
    "/etc/pki/tls/certs",
    "/etc/pki/ca-trust/extracted",
    "/etc/ca-certificates",
    "/usr/share/ca-certificates",
    "/usr/lib/ssl",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/localtime",
    "/usr/share/zoneinfo",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
];

/// Shared libraries of `binary`, as `ldd` lists them (absolute paths). Where there is no
/// `ldd` (it is glibc's script: a distroless or `FROM scratch` image running the static
/// binary has none), read from the ELF files instead.
pub fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    match std::process::Command::new("ldd").arg(binary).output() {
        Ok(out) => parse_ldd(&String::from_utf8_lossy(&out.stdout)),
        Err(_) => elf_libraries(binary),
    }
}

/// The program interpreter and the `DT_NEEDED` libraries of `binary`, transitively, found
/// as the dynamic loader looks for them: `DT_RPATH`/`DT_RUNPATH` (with `$ORIGIN`), the
/// directories of /etc/ld.so.conf, then the default ones. Only files of the binary's own
/// class and machine count, so a 32-bit library of the same name is passed over.
pub fn elf_libraries(binary: &Path) -> Vec<PathBuf> {
    use goblin::elf::Elf;
    let Some(kind) = elf_kind(binary) else {
        return Vec::new();
    };
    let system = system_library_dirs();
    let mut found: Vec<PathBuf> = Vec::new();
    let mut queue = vec![binary.to_path_buf()];
    let mut seen: BTreeSet<PathBuf> = BTreeSet::new();
    while let Some(file) = queue.pop() {
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        let Ok(elf) = Elf::parse(&bytes) else {
            continue;
        };
        if file == binary {
            found.extend(elf.interpreter.map(PathBuf::from));
        }
        let origin = file.parent().unwrap_or(Path::new("/")).to_string_lossy();
        let own: Vec<PathBuf> = elf
            .rpaths
            .iter()
            .chain(&elf.runpaths)
            .flat_map(|p| p.split(':'))
            .map(|d| PathBuf::from(d.replace("${ORIGIN}", &origin).replace("$ORIGIN", &origin)))
            .collect();
        for name in &elf.libraries {
            let candidates: Vec<PathBuf> = if name.contains('/') {
                vec![PathBuf::from(name)]
            } else {
                own.iter().chain(&system).map(|d| d.join(name)).collect()
            };
            let hit = candidates.into_iter().find(|c| elf_kind(c) == Some(kind));
            if let Some(lib) = hit
                && seen.insert(lib.clone())
            {
                found.push(lib.clone());
                queue.push(lib);
            }
        }
    }
    found
}

/// An ELF file's class (64-bit or not) and machine, read from its header alone.
fn elf_kind(path: &Path) -> Option<(bool, u16)> {
    use std::io::Read;
    let mut header = [0u8; goblin::elf::header::header64::SIZEOF_EHDR];
    std::fs::File::open(path)
        .ok()?
        .read_exact(&mut header)
        .ok()?;
    let h = goblin::elf::Elf::parse_header(&header).ok()?;
    Some((
        h.e_ident[goblin::elf::header::EI_CLASS] == goblin::elf::header::ELFCLASS64,
        h.e_machine,
    ))
}

/// Scripts that a distribution's Node.js reads as it starts, from the paths compiled
/// into its shared `libnode`: Debian and Ubuntu build it with some built-in modules kept
/// as files of other packages (`/usr/share/nodejs/acorn/dist/acorn.js`, undici's fetch,
/// cjs-module-lexer), and it aborts when one is missing. Found as the NUL-terminated
/// absolute `.js` paths in the read-only data of each `libnode*` among `libraries` that
/// exist on this host. Node's official builds (one binary, no `libnode`) need none.
pub fn node_builtin_scripts(libraries: &[PathBuf]) -> Vec<PathBuf> {
    let libnode = libraries.iter().filter(|l| {
        l.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("libnode"))
    });
    let mut found = BTreeSet::new();
    for lib in libnode {
        for path in embedded_scripts(lib) {
            if path.is_file() {
                found.insert(path);
            }
        }
    }
    found.into_iter().collect()
}

/// The NUL-terminated absolute `.js` paths in the `.rodata` of the ELF file `file`.
fn embedded_scripts(file: &Path) -> Vec<PathBuf> {
    use goblin::elf::Elf;
    let Ok(bytes) = std::fs::read(file) else {
        return Vec::new();
    };
    let Ok(elf) = Elf::parse(&bytes) else {
        return Vec::new();
    };
    let rodata = elf
        .section_headers
        .iter()
        .find(|sh| elf.shdr_strtab.get_at(sh.sh_name) == Some(".rodata"));
    let Some(data) = rodata.and_then(|sh| {
        let start = usize::try_from(sh.sh_offset).ok()?;
        let end = start.checked_add(usize::try_from(sh.sh_size).ok()?)?;
        bytes.get(start..end)
    }) else {
        return Vec::new();
    };
    data.split(|b| *b == 0)
        .filter(|s| s.len() < 4096 && s.starts_with(b"/") && s.ends_with(b".js"))
        .filter_map(|s| std::str::from_utf8(s).ok())
        .map(PathBuf::from)
        .collect()
}

/// The loader's search list after a binary's own paths: /etc/ld.so.conf (and the files
/// it includes), then the multiarch and plain default directories.
fn system_library_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let mut confs = vec![PathBuf::from("/etc/ld.so.conf")];
    while let Some(conf) = confs.pop() {
        let Ok(text) = std::fs::read_to_string(&conf) else {
            continue;
        };
        for line in text
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
        {
            if let Some(pattern) = line.strip_prefix("include") {
                // `include /etc/ld.so.conf.d/*.conf`: the directory's .conf files.
                let pattern = Path::new(pattern.trim());
                if let (Some(dir), Some(suffix)) = (
                    pattern.parent(),
                    pattern
                        .file_name()
                        .and_then(|n| n.to_str()?.strip_prefix('*')),
                ) && let Ok(entries) = std::fs::read_dir(dir)
                {
                    let mut files: Vec<PathBuf> = entries
                        .flatten()
                        .map(|e| e.path())
                        .filter(|p| p.to_string_lossy().ends_with(suffix))
                        .collect();
                    files.sort();
                    confs.extend(files.into_iter().rev());
                }
            } else if line.starts_with('/') {
                dirs.push(PathBuf::from(line));
            }
        }
    }
    let triplet = format!("{}-linux-gnu", std::env::consts::ARCH);
    for base in ["/lib", "/usr/lib"] {
        dirs.push(Path::new(base).join(&triplet));
    }
    dirs.extend(["/lib64", "/usr/lib64", "/lib", "/usr/lib"].map(PathBuf::from));
    dirs
}

pub fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let candidate = match line.split_once("=>") {
                Some((_, rhs)) => rhs.trim(),
                None => line,
            };
            let path = candidate.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_libraries_agree_with_ldd() {
        // This test binary is dynamically linked here (glibc); ldd is the reference.
        let me = std::env::current_exe().expect("the test binary");
        let from_ldd: BTreeSet<PathBuf> = shared_libraries(&me)
            .into_iter()
            .filter_map(|p| p.canonicalize().ok())
            .collect();
        let from_elf: BTreeSet<PathBuf> = elf_libraries(&me)
            .into_iter()
            .filter_map(|p| p.canonicalize().ok())
            .collect();
        if from_ldd.is_empty() {
            // A static test binary (musl): nothing to find either way.
            assert!(from_elf.is_empty(), "{from_elf:?}");
            return;
        }
        assert_eq!(from_elf, from_ldd);
    }

    /// Paths as a distribution's libnode holds them, in this test binary's `.rodata`.
    static BUILTIN_PATHS: &[u8] =
        b"\0/tmp/sandbox-root-test-builtins/acorn.js\0/nonexistent/sandbox/undici.js\0";

    #[test]
    fn a_shared_libnodes_builtin_scripts_are_found_where_they_exist() {
        std::hint::black_box(BUILTIN_PATHS);
        let present = Path::new("/tmp/sandbox-root-test-builtins/acorn.js");
        std::fs::create_dir_all(present.parent().expect("a directory")).expect("mkdir");
        std::fs::write(present, "module.exports = {}").expect("write");
        let dir = tempfile::tempdir().expect("tempdir");
        let me = std::env::current_exe().expect("the test binary");
        let libnode = dir.path().join("libnode.so.108");
        let other = dir.path().join("libother.so.1");
        std::fs::copy(&me, &libnode).expect("copy");
        std::fs::copy(&me, &other).expect("copy");
        // Only a libnode is read, and only paths that exist are kept.
        assert_eq!(
            node_builtin_scripts(&[other.clone(), libnode]),
            vec![present.to_path_buf()]
        );
        assert!(node_builtin_scripts(&[other]).is_empty());
    }

    #[test]
    fn ldd_output_is_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n\tlibfoo.so => not found\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn symlinks_are_mirrored_and_nested_binds_folded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::create_dir_all(d.join("usr/lib/x")).unwrap();
        std::fs::write(d.join("usr/lib/x/libc.so"), b"").unwrap();
        std::os::unix::fs::symlink("usr/lib", d.join("lib")).unwrap();
        let mut b = RootBuilder::new();
        assert!(b.add(&d.join("lib/x/libc.so")));
        assert!(b.add(&d.join("usr/lib")));
        assert!(!b.add(&d.join("missing")));
        let plan = b.build();
        assert_eq!(plan.binds, vec![d.join("usr/lib")]);
        assert_eq!(
            plan.symlinks,
            vec![(d.join("lib"), PathBuf::from("usr/lib"))]
        );
    }

    #[test]
    fn secrets_are_never_bound() {
        let mut b = RootBuilder::new();
        assert!(!b.add(Path::new("/etc/shadow")));
        assert!(!b.add(Path::new("/etc/ssl/private")));
        assert!(b.build().binds.is_empty());
    }
}
