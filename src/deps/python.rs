//! pip: what a requirements file names, the local files it refers to, and how pip is
//! told to install it inside the installer's jail.

use std::path::{Path, PathBuf};

use super::Dependency;
use super::tree;

/// The package names of a pip requirements file (comments, options and markers dropped).
pub fn requirement_names(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty() && !l.starts_with('-'))
        .filter_map(|l| {
            let end = l
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'))
                .unwrap_or(l.len());
            let name = &l[..end];
            (!name.is_empty()).then(|| name.to_string())
        })
        .collect()
}

/// Relative paths a requirements file names (`./localpkg`, `../x`, `wheels/x.whl`, or
/// `name @ file:./x`): pip reads them relative to its working directory, which in the
/// installer's jail is the directory staged from the file's own.
pub fn local_paths(text: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split(" #").next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        for token in line.split_whitespace() {
            let token = token.trim_start_matches("file:");
            let token = token.split(['[', ';']).next().unwrap_or("");
            let local = token.starts_with("./")
                || token.starts_with("../")
                || token.ends_with(".whl")
                || token.ends_with(".tar.gz")
                || token.ends_with(".zip");
            if local && !token.contains("://") && !token.starts_with('/') {
                out.push(PathBuf::from(token));
            }
        }
    }
    out
}

/// pip's index options for a mirror; a plain-http mirror is also trusted, as pip
/// otherwise refuses it.
pub fn mirror_args(mirror: &str) -> Vec<String> {
    let mirror = mirror.trim();
    if mirror.is_empty() {
        return Vec::new();
    }
    let mut args = vec!["--index-url".to_string(), mirror.to_string()];
    if let Some(rest) = mirror.strip_prefix("http://") {
        let host = rest.split(['/', '?']).next().unwrap_or("");
        let host = host.rsplit('@').next().unwrap_or(host);
        let host = host.split(':').next().unwrap_or(host);
        if !host.is_empty() {
            args.push("--trusted-host".into());
            args.push(host.to_string());
        }
    }
    args
}

/// pip's command line in the jail: the requirements at `job/<file>`, installed into
/// `target`; from `offline` (a directory of wheels and sdists) and no index when given.
pub fn pip_args(
    file: &str,
    target: &Path,
    mirror: &str,
    offline: Option<&Path>,
    ca_bundle: Option<&Path>,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "install",
        "--no-input",
        "--disable-pip-version-check",
        "--no-warn-script-location",
        "--no-cache-dir",
        "--progress-bar",
        "off",
        "--target",
    ]
    .map(String::from)
    .into();
    args.push(target.display().to_string());
    args.push("-r".into());
    args.push(file.to_string());
    match offline {
        Some(dir) => {
            args.extend(["--no-index".into(), "--find-links".into()]);
            args.push(dir.display().to_string());
        }
        None => args.extend(mirror_args(mirror)),
    }
    if let Some(ca) = ca_bundle {
        args.push("--cert".into());
        args.push(ca.display().to_string());
    }
    args
}

/// The installer's code: pip, run in the jail's interpreter as `python -m pip` would.
pub fn installer_code(args: &[String]) -> String {
    let args = serde_json::to_string(args).unwrap_or_else(|_| "[]".into());
    format!(
        "import json, runpy, sys\n\
         sys.argv = ['pip'] + json.loads({args:?})\n\
         runpy.run_module('pip', run_name='__main__', alter_sys=True)\n"
    )
}

/// Name and version of every distribution installed in `dir` (from `*.dist-info/METADATA`).
/// What an installer left there is not trusted: links are not followed.
pub fn installed_in(dir: &Path) -> Vec<Dependency> {
    let mut out = Vec::new();
    for name in tree::real_dirs(dir) {
        if !name.ends_with(".dist-info") {
            continue;
        }
        let Some(meta) = tree::read_regular(&dir.join(&name).join("METADATA")) else {
            continue;
        };
        let field = |key: &str| {
            meta.lines()
                .take_while(|l| !l.is_empty())
                .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        };
        if let (Some(name), Some(version)) = (field("Name:"), field("Version:")) {
            out.push(Dependency { name, version });
        }
    }
    out.sort_by_key(|d| d.name.to_lowercase());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn requirement_lines_yield_names() {
        let text = "# comment\njinja2>=3.0\nrequests==2.31.0 ; python_version>'3'\n-r other.txt\n\nhttpx[http2]\nmy_pkg.sub\n";
        assert_eq!(
            requirement_names(text),
            vec!["jinja2", "requests", "httpx", "my_pkg.sub"]
        );
    }

    #[test]
    fn local_paths_are_the_relative_ones() {
        let text = "six\n./localpkg\nwheels/x-1.0-py3-none-any.whl\nfoo @ file:./vendored/foo\nbar @ https://h/bar.tar.gz\n/abs/pkg.zip\n";
        assert_eq!(
            local_paths(text),
            vec![
                PathBuf::from("./localpkg"),
                PathBuf::from("wheels/x-1.0-py3-none-any.whl"),
                PathBuf::from("./vendored/foo"),
            ]
        );
    }

    #[test]
    fn http_mirrors_are_trusted_https_ones_are_not() {
        assert!(mirror_args("").is_empty());
        assert_eq!(
            mirror_args("http://user:pw@mirror.local:8080/simple"),
            vec![
                "--index-url",
                "http://user:pw@mirror.local:8080/simple",
                "--trusted-host",
                "mirror.local"
            ]
        );
        assert_eq!(
            mirror_args("https://pypi.example/simple"),
            vec!["--index-url", "https://pypi.example/simple"]
        );
    }

    #[test]
    fn offline_installs_use_no_index() {
        let args = pip_args(
            "r.txt",
            Path::new("/tmp/out"),
            "https://m/simple",
            Some(Path::new("/job/offline")),
            None,
        );
        assert!(args.contains(&"--no-index".to_string()));
        assert!(!args.contains(&"--index-url".to_string()));
        let code = installer_code(&args);
        assert!(code.contains("runpy.run_module('pip'"), "{code}");
    }

    #[test]
    fn metadata_gives_names_and_versions_and_links_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let info = dir.path().join("six-1.16.0.dist-info");
        fs::create_dir(&info).unwrap();
        fs::write(
            info.join("METADATA"),
            "Metadata-Version: 2.1\nName: six\nVersion: 1.16.0\n\nName: not-this\n",
        )
        .unwrap();
        fs::create_dir(dir.path().join("six")).unwrap();
        // An installer's link to a file of the host is not read.
        let outside = tempfile::tempdir().unwrap();
        let fake = outside.path().join("x.dist-info");
        fs::create_dir(&fake).unwrap();
        fs::write(fake.join("METADATA"), "Name: secret\nVersion: 1\n").unwrap();
        std::os::unix::fs::symlink(&fake, dir.path().join("evil.dist-info")).unwrap();
        let linked = dir.path().join("linked-1.dist-info");
        fs::create_dir(&linked).unwrap();
        std::os::unix::fs::symlink(fake.join("METADATA"), linked.join("METADATA")).unwrap();
        assert_eq!(
            installed_in(dir.path()),
            vec![Dependency {
                name: "six".into(),
                version: "1.16.0".into()
            }]
        );
    }
}
