//! End-to-end: `cargo xtask build-linux` against a real Docker engine.
//!
//! No image registry is assumed, so the builder image is made from this
//! machine: the Debian packages a Rust build needs (gcc, libc6-dev,
//! libseccomp-dev, pkg-config and their dependencies), `/etc` for CA
//! certificates and DNS, and the active Rust toolchain, imported as a root
//! filesystem (`POST /images/create?fromSrc=-`, i.e. `docker import`). The
//! image is tagged by a hash of the toolchain and package versions and reused
//! while they do not change.
//!
//! Environment:
//! - `SANDBOX_SKIP_DOCKER_TESTS=1` skips the test.
//! - `SANDBOX_TEST_BUILDER_IMAGE=<image>` uses that builder image instead.
//! - `SANDBOX_TEST_SOURCE=<dir>` builds that tree instead of this workspace.
//!
//! The tree is snapshotted once, so both runs see the same source.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::query_parameters::CreateImageOptionsBuilder;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

/// Debian packages the build needs; their dependencies are added.
const ROOT_PACKAGES: &[&str] = &[
    "gcc",
    "libc6-dev",
    "libseccomp-dev",
    "pkgconf|pkg-config",
    "dash",
    "coreutils",
];
/// Documentation is not needed to compile and makes the import slower.
const SKIP_PREFIXES: &[&str] = &[
    "/usr/share/doc",
    "/usr/share/man",
    "/usr/share/info",
    "/usr/share/locale",
    "/usr/share/lintian",
];

#[test]
fn build_linux_end_to_end() {
    if std::env::var("SANDBOX_SKIP_DOCKER_TESTS").as_deref() == Ok("1") {
        eprintln!("skipped: SANDBOX_SKIP_DOCKER_TESTS=1 (this test needs a Docker engine)");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");

    let docker = match runtime.block_on(xtask::docker::Discovery::from_process().connect()) {
        Ok(connected) => connected.docker,
        // CI starts an engine first (.ci/start-dockerd.sh), and fails if it cannot.
        Err(e) => {
            eprintln!(
                "skipped: no Docker engine answers; this test needs one: start it with \
                 .ci/start-dockerd.sh. What was tried:\n{e}"
            );
            return;
        }
    };

    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no Linux build target for host architecture {other}"),
    };
    let image = match std::env::var("SANDBOX_TEST_BUILDER_IMAGE") {
        Ok(image) if !image.is_empty() => image,
        _ => {
            let started = Instant::now();
            let image = runtime.block_on(host_builder_image(&docker));
            eprintln!(
                "builder image {image} ready in {:.1}s",
                started.elapsed().as_secs_f64()
            );
            image
        }
    };

    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e-dist");
    let _ = std::fs::remove_dir_all(&out);
    let mut args: Vec<String> = [
        "build-linux",
        "--arch",
        arch,
        "--image",
        &image,
        "--profile",
        "debug",
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(out.display().to_string());
    args.extend([
        "--source".to_string(),
        snapshot_source().display().to_string(),
    ]);

    let first = run_xtask(&args);
    let binary = out.join(format!("linux-{arch}")).join("sandbox");
    check_artifact(&first.stdout, &binary);

    let version = Command::new(&binary)
        .arg("--version")
        .output()
        .expect("run the built binary");
    assert!(
        version.status.success(),
        "{} --version failed: {}{}",
        binary.display(),
        String::from_utf8_lossy(&version.stdout),
        String::from_utf8_lossy(&version.stderr)
    );
    eprintln!(
        "{} --version: {}",
        binary.display(),
        String::from_utf8_lossy(&version.stdout).trim()
    );

    let second = run_xtask(&args);
    check_artifact(&second.stdout, &binary);
    // The target volume must have kept the dependencies: only the
    // workspace's own crate may be compiled again.
    let recompiled: Vec<&str> = second
        .stderr
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("Compiling ") && !l.starts_with("Compiling sandbox "))
        .collect();
    assert!(
        recompiled.is_empty(),
        "the second build recompiled dependencies, so the cache volumes did not work: {recompiled:?}"
    );
    eprintln!(
        "build-linux --profile debug: first run {:.1}s, second run {:.1}s",
        first.took.as_secs_f64(),
        second.took.as_secs_f64()
    );
}

/// Copies the tree to build (this workspace, or `SANDBOX_TEST_SOURCE`) once,
/// with its modification times, so both runs compile the same source even
/// while the checkout is being edited.
fn snapshot_source() -> PathBuf {
    let root = match std::env::var("SANDBOX_TEST_SOURCE") {
        Ok(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("xtask lives inside the workspace")
            .to_path_buf(),
    };
    let (tar, _) = xtask::archive::source_tar(&root, "src").expect("archive the source tree");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e-source");
    let _ = std::fs::remove_dir_all(&dir);
    tar::Archive::new(&tar[..])
        .unpack(&dir)
        .expect("unpack the source snapshot");
    dir.join("src")
}

struct Run {
    stdout: String,
    stderr: String,
    took: Duration,
}

fn run_xtask(args: &[String]) -> Run {
    eprintln!("$ cargo xtask {}", args.join(" "));
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("start the xtask binary");
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    eprintln!("{stderr}{stdout}(took {:.1}s)", took.as_secs_f64());
    assert!(
        output.status.success(),
        "cargo xtask build-linux failed with {}",
        output.status
    );
    Run {
        stdout,
        stderr,
        took,
    }
}

/// The summary names the binary with the sha256 of the file on disk.
fn check_artifact(summary: &str, binary: &Path) {
    let line = summary
        .lines()
        .find(|l| l.contains(&binary.display().to_string()))
        .unwrap_or_else(|| panic!("summary does not list {}:\n{summary}", binary.display()));
    let reported = line.split_whitespace().last().unwrap_or_default();
    let bytes = std::fs::read(binary).expect("read the built binary");
    let actual = xtask::docker::hex(&Sha256::digest(&bytes));
    assert_eq!(reported, actual, "sha256 in the summary: {line}");
    let sums = std::fs::read_to_string(binary.with_file_name("SHA256SUMS")).expect("SHA256SUMS");
    assert_eq!(sums, format!("{actual}  sandbox\n"));
}

/// Builds (or reuses) an image holding this host's compiler toolchain.
async fn host_builder_image(docker: &Docker) -> String {
    let sysroot = PathBuf::from(
        String::from_utf8(
            Command::new("rustc")
                .args(["--print", "sysroot"])
                .output()
                .expect("run rustc --print sysroot")
                .stdout,
        )
        .expect("sysroot is UTF-8")
        .trim(),
    );
    let rustc_version = Command::new(sysroot.join("bin/rustc"))
        .arg("-vV")
        .output()
        .expect("run rustc -vV")
        .stdout;
    let packages = package_closure();

    let mut key = Sha256::new();
    key.update(&rustc_version);
    key.update(sysroot.as_os_str().as_encoded_bytes());
    for (name, version) in &packages {
        key.update(format!("{name}={version}\n"));
    }
    let tag = &xtask::docker::hex(&key.finalize())[..16];
    let image = format!("sandbox-test-builder:{tag}");
    if docker.inspect_image(&image).await.is_ok() {
        return image;
    }

    let files = package_files(packages.keys());
    let sysroot_for_tar = sysroot.clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let writer = tokio::task::spawn_blocking(move || write_rootfs(&files, &sysroot_for_tar, tx));
    let body = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(Into::into);

    let options = CreateImageOptionsBuilder::default()
        .from_src("-")
        .repo("sandbox-test-builder")
        .tag(tag)
        .changes(vec![
            format!(
                "ENV PATH={}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                sysroot.display()
            ),
            "ENV HOME=/root".to_string(),
            "ENV CARGO_HOME=/root/.cargo".to_string(),
            format!("LABEL {}=test-builder", xtask::images::LABEL),
        ])
        .build();
    let mut stream = docker.create_image(Some(options), Some(bollard::body_stream(body)), None);
    while let Some(item) = stream.next().await {
        if let Err(e) = item {
            panic!("importing the host toolchain as {image} failed: {e}");
        }
    }
    writer
        .await
        .expect("rootfs writer panicked")
        .expect("write the rootfs tar");
    image
}

/// Installed packages needed for the build, with their dependencies, as
/// name -> version. Alternatives take the first installed choice.
fn package_closure() -> BTreeMap<String, String> {
    let output = Command::new("dpkg-query")
        .args([
            "-W",
            "-f=${Package}\t${db:Status-Abbrev}\t${Version}\t${Provides}\t${Depends}, ${Pre-Depends}\n",
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "dpkg-query is needed to assemble a builder image from this host ({e}); \
                 on a non-Debian host set SANDBOX_TEST_BUILDER_IMAGE to an image with \
                 cargo, gcc, pkg-config and libseccomp-dev"
            )
        });
    let text = String::from_utf8_lossy(&output.stdout);
    let mut depends: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut provides: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 5 || !f[1].starts_with("ii") {
            continue;
        }
        depends.insert(f[0].to_string(), (f[2].to_string(), f[4].to_string()));
        for p in f[3].split(',') {
            if let Some(name) = dep_name(p) {
                provides.entry(name).or_insert_with(|| f[0].to_string());
            }
        }
    }
    let resolve = |alternatives: &str| -> Option<String> {
        alternatives.split('|').find_map(|alt| {
            let name = dep_name(alt)?;
            if depends.contains_key(&name) {
                Some(name)
            } else {
                provides.get(&name).cloned()
            }
        })
    };
    let mut todo: Vec<String> = Vec::new();
    for root in ROOT_PACKAGES {
        match resolve(root) {
            Some(p) => todo.push(p),
            None => panic!(
                "package {root} is not installed; run: apt-get install -y gcc libc6-dev \
                 libseccomp-dev pkg-config (or set SANDBOX_TEST_BUILDER_IMAGE)"
            ),
        }
    }
    let mut closure = BTreeMap::new();
    while let Some(p) = todo.pop() {
        if closure.contains_key(&p) {
            continue;
        }
        let Some((version, deps)) = depends.get(&p) else {
            continue;
        };
        closure.insert(p.clone(), version.clone());
        todo.extend(deps.split(',').filter_map(resolve));
    }
    closure
}

/// "libc6 (>= 2.34)" or "libfoo:any" -> "libc6" / "libfoo".
fn dep_name(dep: &str) -> Option<String> {
    let name = dep.split_whitespace().next()?.split(':').next()?;
    (!name.is_empty()).then(|| name.to_string())
}

/// Files the packages installed, resolved through symlinked directories
/// (`/bin/bash` is `/usr/bin/bash` on a merged-/usr system), plus the
/// `update-alternatives` links in /usr/bin such as `cc`.
fn package_files<'a>(packages: impl Iterator<Item = &'a String>) -> BTreeSet<PathBuf> {
    let names: Vec<&String> = packages.collect();
    let output = Command::new("dpkg-query")
        .arg("-L")
        .args(&names)
        .output()
        .expect("dpkg-query -L");
    let mut files = BTreeSet::new();
    let listed = String::from_utf8_lossy(&output.stdout).into_owned();
    let alternatives = std::fs::read_dir("/usr/bin")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| std::fs::read_link(p).is_ok_and(|t| t.starts_with("/etc/alternatives")))
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>();
    for line in listed.lines().map(str::to_string).chain(alternatives) {
        if !line.starts_with('/')
            || line.starts_with("/etc/")
            || SKIP_PREFIXES.iter().any(|p| line.starts_with(p))
        {
            continue;
        }
        let path = Path::new(&line);
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            continue;
        };
        let Ok(parent) = parent.canonicalize() else {
            continue;
        };
        let real = parent.join(name);
        if let Ok(meta) = std::fs::symlink_metadata(&real)
            && !meta.is_dir()
        {
            files.insert(real);
        }
    }
    files
}

/// Sends tar data to the engine in chunks as it is produced.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 1 << 20 {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = std::mem::take(&mut self.buf);
            self.tx
                .blocking_send(chunk)
                .map_err(|_| std::io::Error::other("the engine stopped reading the import"))?;
        }
        Ok(())
    }
}

/// Writes the root filesystem: top-level symlinks of a merged-/usr system,
/// the package files with their directories, `/etc`, and the toolchain's
/// `bin/cargo`, `bin/rustc` and `lib/`.
fn write_rootfs(
    files: &BTreeSet<PathBuf>,
    sysroot: &Path,
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
) -> std::io::Result<()> {
    let mut tar = tar::Builder::new(ChannelWriter {
        tx,
        buf: Vec::new(),
    });
    tar.follow_symlinks(false);
    let mut added: HashSet<PathBuf> = HashSet::new();

    for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
        if std::fs::symlink_metadata(top).is_ok_and(|m| m.is_symlink()) {
            add(&mut tar, &mut added, Path::new(top))?;
        }
    }
    for file in files {
        add(&mut tar, &mut added, file)?;
    }
    add_tree(&mut tar, &mut added, Path::new("/etc"))?;
    add(&mut tar, &mut added, &sysroot.join("bin/cargo"))?;
    add(&mut tar, &mut added, &sysroot.join("bin/rustc"))?;
    add_tree(&mut tar, &mut added, &sysroot.join("lib"))?;
    for dir in ["/tmp", "/root"] {
        add(&mut tar, &mut added, Path::new(dir))?;
    }
    let mut writer = tar.into_inner()?;
    writer.flush()
}

/// Adds `path` after its parent directories; each path at most once.
fn add(
    tar: &mut tar::Builder<ChannelWriter>,
    added: &mut HashSet<PathBuf>,
    path: &Path,
) -> std::io::Result<()> {
    if added.contains(path) {
        return Ok(());
    }
    if let Some(parent) = path.parent()
        && parent != Path::new("/")
    {
        add(tar, added, parent)?;
    }
    let name = path.strip_prefix("/").unwrap_or(path);
    match tar.append_path_with_name(path, name) {
        Ok(()) => {}
        // Unreadable files (e.g. /etc/shadow when not root) are not needed.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
        Err(e) => return Err(e),
    }
    added.insert(path.to_path_buf());
    Ok(())
}

fn add_tree(
    tar: &mut tar::Builder<ChannelWriter>,
    added: &mut HashSet<PathBuf>,
    dir: &Path,
) -> std::io::Result<()> {
    add(tar, added, dir)?;
    let mut entries: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Ok(()),
        Err(e) => return Err(e),
    };
    entries.sort();
    for entry in entries {
        let meta = std::fs::symlink_metadata(&entry)?;
        if meta.is_dir() {
            add_tree(tar, added, &entry)?;
        } else {
            add(tar, added, &entry)?;
        }
    }
    Ok(())
}
