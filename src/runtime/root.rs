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

/// Shared libraries of `binary`, as `ldd` lists them (absolute paths).
pub fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let Ok(out) = std::process::Command::new("ldd").arg(binary).output() else {
        return Vec::new();
    };
    parse_ldd(&String::from_utf8_lossy(&out.stdout))
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
