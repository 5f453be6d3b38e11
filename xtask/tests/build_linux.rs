//! End-to-end: `cargo xtask build-linux` against a real Docker engine, and what it
//! hands out.
//!
//! No image registry is assumed, so the base of the builder image is made on this
//! machine: a minimal Debian root (`debootstrap --variant=minbase`, this host's release
//! and mirror) with this host's active Rust toolchain in /opt/rust, imported as an image
//! (`POST /images/create?fromSrc=-`, i.e. `docker import`) and tagged by a hash of the
//! toolchain and release, so it is made once. `build-linux` then builds the real
//! docker/builder.Dockerfile on it (`--base-image`): Debian's packages and crates.io
//! are reached from the containers.
//!
//! The default output (musl, amd64 here) must be static: no `PT_INTERP`, no
//! `DT_NEEDED`, read from the ELF. It then runs `--version`, `doctor --json` and a
//! `run` of a Python snippet in a container whose image holds nothing but that binary
//! and this host's Python interpreter (its executable, the shared libraries it and its
//! extension modules load, its standard library).
//!
//! Environment:
//! - `SANDBOX_SKIP_DOCKER_TESTS=1` skips the test.
//! - `SANDBOX_TEST_BUILDER_IMAGE=<image>` uses that builder image instead (`--image`).
//! - `SANDBOX_TEST_SOURCE=<dir>` builds that tree instead of this workspace.
//!
//! The tree is snapshotted once, so both runs see the same source.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::query_parameters::CreateImageOptionsBuilder;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

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
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e-dist");
    let _ = std::fs::remove_dir_all(&out);
    let mut args: Vec<String> = ["build-linux", "--arch", arch, "--profile", "debug"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    match std::env::var("SANDBOX_TEST_BUILDER_IMAGE") {
        Ok(image) if !image.is_empty() => args.extend(["--image".to_string(), image]),
        _ => {
            let started = Instant::now();
            let base = runtime.block_on(rust_base_image(&docker));
            eprintln!(
                "builder base {base} ready in {:.1}s",
                started.elapsed().as_secs_f64()
            );
            args.extend(["--base-image".to_string(), base]);
        }
    }
    args.extend([
        "--out".to_string(),
        out.display().to_string(),
        "--source".to_string(),
        snapshot_source().display().to_string(),
    ]);

    let first = run_xtask(&args);
    let binary = out.join(format!("linux-{arch}")).join("sandbox");
    check_artifact(&first.stdout, &binary);
    check_static(&binary);

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
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    eprintln!("{} --version: {version}", binary.display());

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

    let image = runtime.block_on(binary_and_python_image(&docker, &binary));
    runs_alone_with_python(&image, &version);
}

/// No program interpreter and no shared library: the binary starts on any Linux kernel
/// of its architecture, whatever its C library.
fn check_static(binary: &Path) {
    let bytes = std::fs::read(binary).expect("read the built binary");
    let elf = goblin::elf::Elf::parse(&bytes).expect("the binary is an ELF file");
    let interp = elf
        .program_headers
        .iter()
        .find(|ph| ph.p_type == goblin::elf::program_header::PT_INTERP);
    assert!(
        interp.is_none() && elf.interpreter.is_none(),
        "{} has a program interpreter (PT_INTERP {:?}): it is not static",
        binary.display(),
        elf.interpreter
    );
    assert!(
        elf.libraries.is_empty(),
        "{} needs shared libraries (DT_NEEDED): {:?}",
        binary.display(),
        elf.libraries
    );
    eprintln!(
        "{}: no PT_INTERP, no DT_NEEDED ({} program headers, dynamic section: {})",
        binary.display(),
        elf.program_headers.len(),
        if elf.dynamic.is_some() {
            "present (static-pie relocations only)"
        } else {
            "absent"
        }
    );
}

/// `docker run --rm <image> <args>`; the output, asserting the container ran.
fn docker_run(image: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["run", "--rm", image];
    all.extend_from_slice(args);
    eprintln!("$ docker {}", all.join(" "));
    Command::new("docker")
        .args(&all)
        .output()
        .expect("run the docker CLI")
}

/// The binary's commands in a container of Docker's defaults (no capability added,
/// no privilege) whose image holds only it and Python.
fn runs_alone_with_python(image: &str, version: &str) {
    let out = docker_run(image, &["/sandbox", "--version"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.trim() == version,
        "--version in the container: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = docker_run(image, &["/sandbox", "doctor", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "doctor --json printed no JSON ({e}): {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    eprintln!(
        "doctor --json in the container (exit {}): {report}",
        out.status
    );
    let checks = doctor_checks(&report);
    assert!(
        !checks.is_empty(),
        "doctor --json lists no checks: {report}"
    );
    let python = checks
        .iter()
        .find(|(name, _)| name.to_lowercase().contains("python"))
        .unwrap_or_else(|| panic!("doctor --json has no Python check: {report}"));
    assert_eq!(python.1, "ok", "doctor's Python check: {report}");

    let out = docker_run(
        image,
        &[
            "/sandbox",
            "run",
            "--json",
            "-l",
            "python3",
            "-e",
            "import sys, json; print(json.dumps([6 * 7, sys.version_info[0]]))",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let result: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "run --json printed no JSON ({e}): {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    eprintln!("run --json in the container: {result}");
    assert!(
        out.status.success(),
        "run exited with {}: {result}",
        out.status
    );
    assert_eq!(result["stdout"], "[42, 3]\n", "{result}");
    assert_eq!(result["exit_code"], 0, "{result}");
}

/// (name, status) of each check in doctor's JSON, wherever the list sits.
fn doctor_checks(report: &serde_json::Value) -> Vec<(String, String)> {
    let mut found = Vec::new();
    fn walk(v: &serde_json::Value, found: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(map) => {
                if let (Some(name), Some(status)) = (
                    map.get("name").and_then(|n| n.as_str()),
                    map.get("status").and_then(|s| s.as_str()),
                ) {
                    found.push((name.to_string(), status.to_string()));
                }
                map.values().for_each(|v| walk(v, found));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, found)),
            _ => {}
        }
    }
    walk(report, &mut found);
    found
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

/// Runs as root: debootstrap and the runtime image's files need it.
fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// This host's Debian release and the mirror its apt uses.
fn host_release_and_mirror() -> (String, String) {
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let codename = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|c| c.trim_matches('"').to_string())
        .filter(|c| !c.is_empty())
        .expect(
            "no VERSION_CODENAME in /etc/os-release: the builder base is made with \
             debootstrap from a Debian host; elsewhere set SANDBOX_TEST_BUILDER_IMAGE",
        );
    let deb822 =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let classic = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    let mirror = deb822
        .lines()
        .find_map(|l| l.strip_prefix("URIs:"))
        .and_then(|uris| uris.split_whitespace().next())
        .or_else(|| {
            classic
                .lines()
                .find_map(|l| l.strip_prefix("deb "))
                .and_then(|rest| rest.split_whitespace().find(|w| w.contains("://")))
        })
        .map(str::to_string)
        .expect("no Debian mirror in /etc/apt/sources.list(.d): debootstrap needs one");
    (codename, mirror)
}

/// A minimal Debian of this host's release with this host's Rust toolchain in
/// /opt/rust: the base for docker/builder.Dockerfile (instead of `rust:1-bookworm`).
async fn rust_base_image(docker: &Docker) -> String {
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
    let (codename, mirror) = host_release_and_mirror();
    let targets: Vec<String> = ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"]
        .iter()
        .filter(|t| sysroot.join("lib/rustlib").join(t).is_dir())
        .map(|t| t.to_string())
        .collect();
    assert_eq!(
        targets.len(),
        2,
        "the musl standard libraries are missing from {}: run \
         `rustup target add x86_64-unknown-linux-musl aarch64-unknown-linux-musl`",
        sysroot.display()
    );

    let mut key = Sha256::new();
    key.update(&rustc_version);
    key.update(sysroot.as_os_str().as_encoded_bytes());
    key.update(format!("{codename} minbase"));
    let tag = &xtask::docker::hex(&key.finalize())[..16];
    let image = format!("sandbox-test-rust:{tag}");
    if docker.inspect_image(&image).await.is_ok() {
        return image;
    }
    assert!(
        is_root(),
        "making the builder base needs root (debootstrap); run as root or set \
         SANDBOX_TEST_BUILDER_IMAGE"
    );
    let rootfs = Path::new(env!("CARGO_TARGET_TMPDIR")).join("debootstrap");
    let _ = std::fs::remove_dir_all(&rootfs);
    eprintln!(
        "$ debootstrap --variant=minbase {codename} {} {mirror}",
        rootfs.display()
    );
    let status = Command::new("debootstrap")
        .args(["--variant=minbase", &codename])
        .arg(&rootfs)
        .arg(&mirror)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start debootstrap ({e}): install it with `apt-get install -y \
                 debootstrap`, or set SANDBOX_TEST_BUILDER_IMAGE"
            )
        });
    assert!(status.success(), "debootstrap failed with {status}");

    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let (root_for_tar, sysroot_for_tar) = (rootfs.clone(), sysroot.clone());
    let writer = tokio::task::spawn_blocking(move || {
        let mut tar = tar::Builder::new(ChannelWriter {
            tx,
            buf: Vec::new(),
        });
        tar.follow_symlinks(false);
        tar.append_dir_all(".", &root_for_tar)?;
        // This host's own certificate authorities (a proxy's, a company's): the
        // builder reaches crates.io the way this host does. ca-certificates in
        // the builder adds them to its bundle.
        if let Ok(local) = std::fs::read_dir("/usr/local/share/ca-certificates") {
            for entry in local.flatten() {
                let name = Path::new("usr/local/share/ca-certificates").join(entry.file_name());
                tar.append_path_with_name(entry.path(), name)?;
            }
        }
        // The toolchain without its documentation and the standard libraries of
        // other systems.
        let rust = Path::new("opt/rust");
        tar.append_dir_all(rust.join("bin"), sysroot_for_tar.join("bin"))?;
        for entry in std::fs::read_dir(sysroot_for_tar.join("lib"))? {
            let entry = entry?;
            let name = entry.file_name();
            if name == "rustlib" {
                continue;
            }
            let dest = rust.join("lib").join(&name);
            if entry.file_type()?.is_dir() {
                tar.append_dir_all(dest, entry.path())?;
            } else {
                tar.append_path_with_name(entry.path(), dest)?;
            }
        }
        for entry in std::fs::read_dir(sysroot_for_tar.join("lib/rustlib"))? {
            let entry = entry?;
            let name = entry.file_name();
            if name.to_string_lossy().contains("apple") || name == "src" {
                continue;
            }
            let dest = rust.join("lib/rustlib").join(&name);
            if entry.file_type()?.is_dir() {
                tar.append_dir_all(dest, entry.path())?;
            } else {
                tar.append_path_with_name(entry.path(), dest)?;
            }
        }
        let mut writer = tar.into_inner()?;
        writer.flush()
    });
    import(
        docker,
        "sandbox-test-rust",
        tag,
        rx,
        vec![
            "ENV PATH=/opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
                .to_string(),
            "ENV HOME=/root".to_string(),
            "ENV CARGO_HOME=/root/.cargo".to_string(),
            format!("LABEL {}=test-rust-base", xtask::images::LABEL),
        ],
    )
    .await;
    writer
        .await
        .expect("rootfs writer panicked")
        .expect("write the rootfs tar");
    let _ = std::fs::remove_dir_all(&rootfs);
    image
}

/// `docker import` of the tar arriving on `rx` as `repo:tag`.
async fn import(
    docker: &Docker,
    repo: &str,
    tag: &str,
    mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    changes: Vec<String>,
) {
    let body = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(Into::into);
    let options = CreateImageOptionsBuilder::default()
        .from_src("-")
        .repo(repo)
        .tag(tag)
        .changes(changes)
        .build();
    let mut stream = docker.create_image(Some(options), Some(bollard::body_stream(body)), None);
    while let Some(item) = stream.next().await {
        if let Err(e) = item {
            panic!("importing {repo}:{tag} failed: {e}");
        }
    }
}

/// An image of nothing but the sandbox binary (/sandbox) and this host's Python: the
/// interpreter, the shared libraries it and its extension modules load (as `ldd` names
/// them), its standard library, and an empty /tmp.
async fn binary_and_python_image(docker: &Docker, binary: &Path) -> String {
    let python = std::fs::canonicalize("/usr/bin/python3").expect("/usr/bin/python3 on this host");
    let version = Command::new(&python)
        .args([
            "-c",
            "import sys, sysconfig; print(sys.version_info[0], sys.version_info[1], \
             sysconfig.get_path('stdlib'))",
        ])
        .output()
        .expect("run python3");
    let version = String::from_utf8_lossy(&version.stdout).to_string();
    let mut parts = version.split_whitespace();
    let (major, minor, stdlib) = (
        parts.next().expect("python major").to_string(),
        parts.next().expect("python minor").to_string(),
        PathBuf::from(parts.next().expect("python stdlib")),
    );
    let mut needs_libs = vec![python.clone()];
    for entry in std::fs::read_dir(stdlib.join("lib-dynload"))
        .into_iter()
        .flatten()
        .flatten()
    {
        needs_libs.push(entry.path());
    }
    let mut libs = Vec::new();
    for file in &needs_libs {
        let out = Command::new("ldd").arg(file).output().expect("run ldd");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let line = line.trim();
            let path = line.split_once("=>").map_or(line, |(_, rhs)| rhs.trim());
            if let Some(p) = path
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/'))
            {
                libs.push(PathBuf::from(p));
            }
        }
    }
    libs.sort();
    libs.dedup();

    let bytes = std::fs::read(binary).expect("read the built binary");
    let mut key = Sha256::new();
    key.update(&bytes);
    key.update(format!("{major}.{minor} {}", stdlib.display()));
    let tag = xtask::docker::hex(&key.finalize())[..16].to_string();
    let image = format!("sandbox-test-static:{tag}");
    if docker.inspect_image(&image).await.is_ok() {
        return image;
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let binary = binary.to_path_buf();
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut tar = tar::Builder::new(ChannelWriter {
            tx,
            buf: Vec::new(),
        });
        tar.follow_symlinks(false);
        let mut added = HashSet::new();
        tar.append_path_with_name(&binary, "sandbox")?;
        let mut tmp = tar::Header::new_gnu();
        tmp.set_entry_type(tar::EntryType::Directory);
        tmp.set_mode(0o1777);
        tmp.set_size(0);
        tar.append_data(&mut tmp, "tmp", std::io::empty())?;
        add_with_links(&mut tar, &mut added, Path::new("/usr/bin/python3"))?;
        for lib in &libs {
            add_with_links(&mut tar, &mut added, lib)?;
        }
        add_tree(&mut tar, &mut added, &stdlib)?;
        let mut writer = tar.into_inner()?;
        writer.flush()
    });
    import(
        docker,
        "sandbox-test-static",
        &tag,
        rx,
        vec![
            "ENV PATH=/usr/bin".to_string(),
            format!("LABEL {}=test-static", xtask::images::LABEL),
        ],
    )
    .await;
    writer
        .await
        .expect("image writer panicked")
        .expect("write the image's tar");
    image
}

/// Adds `path` and, when it or a directory on the way is a symbolic link, the links
/// and what they lead to, so the path resolves in the image as it does here.
fn add_with_links(
    tar: &mut tar::Builder<ChannelWriter>,
    added: &mut HashSet<PathBuf>,
    path: &Path,
) -> std::io::Result<()> {
    let mut current = PathBuf::from("/");
    let components: Vec<_> = path.components().skip(1).collect();
    for (i, part) in components.iter().enumerate() {
        let next = current.join(part);
        let meta = std::fs::symlink_metadata(&next)?;
        if meta.is_symlink() {
            add(tar, added, &next)?;
            let target = current.join(std::fs::read_link(&next)?);
            let rest: PathBuf = components[i + 1..].iter().collect();
            return add_with_links(tar, added, &normalize(&target.join(rest)));
        }
        current = next;
    }
    add(tar, added, &current)
}

/// `a/b/../c` -> `a/c`, without touching the filesystem.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
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
