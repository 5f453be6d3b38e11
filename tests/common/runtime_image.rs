//! A runtime image made from this host's Debian packages, for tests that run the server
//! in a container: no image registry is assumed. Made once per set of package versions.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("run the docker CLI")
}

/// Packages of the production image (docker/sandbox.Dockerfile), plus what every Debian
/// image has that the server uses: a shell, coreutils, `ldd` (libc-bin, a bash script).
pub const PACKAGES: &[&str] = &[
    "python3",
    "python3-requests",
    "python3-jinja2",
    "python3-httpx",
    "nodejs",
    "libseccomp2",
    "nftables",
    "ca-certificates",
    "dash",
    "coreutils",
    "libc-bin",
    "bash",
];
const SKIP_PREFIXES: &[&str] = &[
    "/usr/share/doc",
    "/usr/share/man",
    "/usr/share/info",
    "/usr/share/locale",
    "/usr/share/lintian",
];
/// The image to run the server in: `SANDBOX_TEST_RUNTIME_IMAGE`, or one made from this
/// host's packages (made once per set of package versions).
pub fn runtime_image() -> String {
    if let Ok(image) = std::env::var("SANDBOX_TEST_RUNTIME_IMAGE")
        && !image.is_empty()
    {
        return image;
    }
    let closure = package_closure();
    let mut key = std::hash::DefaultHasher::new();
    closure.hash(&mut key);
    let image = format!("sandbox-test-runtime:{:016x}", key.finish());
    if docker(&["image", "inspect", &image]).status.success() {
        return image;
    }
    let names: Vec<&str> = closure.iter().filter_map(|p| p.split('=').next()).collect();
    let list = tempfile::NamedTempFile::new().unwrap();
    let mut paths = String::new();
    for p in rootfs_paths(&names) {
        paths.push_str(p.to_str().expect("UTF-8 paths"));
        paths.push('\n');
    }
    std::fs::write(list.path(), paths).unwrap();
    let started = Instant::now();
    let mut tar = Command::new("tar")
        .args(["--no-recursion", "-cf", "-", "-T"])
        .arg(list.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run tar");
    let import = Command::new("docker")
        .args([
            "import",
            "--change",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            "WORKDIR /app",
            "--change",
            "LABEL dev.sandbox.xtask=test-runtime",
            "-",
            &image,
        ])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .expect("run docker import");
    let _ = tar.wait();
    assert!(
        import.status.success(),
        "docker import: {}",
        String::from_utf8_lossy(&import.stderr)
    );
    eprintln!(
        "runtime image {image} made from this host in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    image
}

/// The installed packages the image needs with their dependencies, as `name=version`.
fn package_closure() -> Vec<String> {
    let out = Command::new("apt-cache")
        .args([
            "depends",
            "--recurse",
            "--installed",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
        ])
        .args(PACKAGES)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "apt-cache is needed to make the runtime image from this host ({e}); on a \
                 non-Debian host set SANDBOX_TEST_RUNTIME_IMAGE"
            )
        });
    let names: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('<') && !l.is_empty())
        .map(str::to_string)
        .collect();
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev} ${Package}=${Version}\n"])
        .args(&names)
        .output()
        .expect("run dpkg-query");
    let installed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("ii "))
        .map(|l| l.trim().to_string())
        .collect();
    for needed in ["python3=", "nodejs=", "nftables=", "python3-requests="] {
        assert!(
            installed.iter().any(|p| p.starts_with(needed)),
            "package {needed} is not installed here: apt-get install -y python3 \
             python3-requests python3-jinja2 python3-httpx nodejs libseccomp2 nftables \
             (or set SANDBOX_TEST_RUNTIME_IMAGE)"
        );
    }
    installed
}

/// Every path of the image, each after its parent directories: the top-level links of a
/// merged /usr, the packages' files resolved through them (with Python's compiled
/// `__pycache__`, as an installed image has it), and `/etc` without its secrets.
fn rootfs_paths(packages: &[&str]) -> Vec<PathBuf> {
    let out = Command::new("dpkg-query")
        .arg("-L")
        .args(packages)
        .output()
        .expect("dpkg-query -L");
    let mut files: BTreeSet<PathBuf> = BTreeSet::new();
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in listed.lines() {
        if !line.starts_with('/')
            || line.starts_with("/etc/")
            || SKIP_PREFIXES.iter().any(|p| line.starts_with(p))
        {
            continue;
        }
        let path = Path::new(line);
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            continue;
        };
        let Ok(parent) = parent.canonicalize() else {
            continue;
        };
        let real = parent.join(name);
        let Ok(meta) = std::fs::symlink_metadata(&real) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(cache) = std::fs::read_dir(real.join("__pycache__")) {
                files.extend(cache.flatten().map(|e| e.path()));
            }
        } else {
            files.insert(real);
        }
    }
    let secret = |p: &Path| {
        [
            "/etc/shadow",
            "/etc/gshadow",
            "/etc/ssh",
            "/etc/ssl/private",
        ]
        .iter()
        .any(|s| p.starts_with(s))
            || p.to_string_lossy().ends_with('-')
    };
    let mut etc = vec![PathBuf::from("/etc")];
    while let Some(dir) = etc.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if secret(&path) {
                continue;
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                etc.push(path);
            } else {
                files.insert(path);
            }
        }
    }
    let mut ordered: Vec<PathBuf> = ["/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"]
        .iter()
        .map(PathBuf::from)
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_symlink()))
        .collect();
    let mut seen: BTreeSet<PathBuf> = ordered.iter().cloned().collect();
    for dir in ["/tmp", "/root", "/app"] {
        if Path::new(dir).is_dir() {
            files.insert(PathBuf::from(dir));
        }
    }
    for file in files {
        let mut parents: Vec<PathBuf> = file
            .ancestors()
            .skip(1)
            .filter(|p| *p != Path::new("/"))
            .map(Path::to_path_buf)
            .collect();
        parents.reverse();
        for p in parents.into_iter().chain([file]) {
            if seen.insert(p.clone()) {
                ordered.push(p);
            }
        }
    }
    ordered
}
