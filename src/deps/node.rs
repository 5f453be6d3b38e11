//! npm: what a `package.json` names, the local packages it refers to, and how npm is told
//! to install it inside the installer's jail.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::Dependency;
use super::tree;

/// The dependency sections npm installs for a project (devDependencies are omitted).
const SECTIONS: [&str; 2] = ["dependencies", "optionalDependencies"];

/// Where a dependency spec points at the file's own directory: `file:./x`, `./x`, `../x`.
fn relative_spec(spec: &str) -> Option<&str> {
    let path = spec.strip_prefix("file:").unwrap_or(spec);
    let relative = path.starts_with("./") || path.starts_with("../");
    let bare_file = spec.starts_with("file:") && !path.starts_with('/');
    (relative || bare_file).then_some(path)
}

#[derive(Debug, thiserror::Error)]
#[error("{0}: fix the JSON of the Node dependency file")]
pub struct ManifestError(String);

/// The package names a `package.json` asks for.
pub fn requested(text: &str) -> Result<Vec<String>, ManifestError> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let v: Value = serde_json::from_str(text).map_err(|e| ManifestError(e.to_string()))?;
    let mut names = Vec::new();
    for section in SECTIONS {
        if let Some(deps) = v.get(section).and_then(Value::as_object) {
            names.extend(deps.keys().cloned());
        }
    }
    Ok(names)
}

/// The local paths a `package.json` names, relative to its directory.
pub fn local_paths(text: &str) -> Vec<PathBuf> {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for section in SECTIONS {
        if let Some(deps) = v.get(section).and_then(Value::as_object) {
            out.extend(
                deps.values()
                    .filter_map(Value::as_str)
                    .filter_map(relative_spec)
                    .map(PathBuf::from),
            );
        }
    }
    out
}

/// The manifest npm installs from in the new generation: local specs point at the staged
/// copy of the file's directory (`job`), where the user's relative paths lead.
pub fn manifest_for(text: &str, job: &Path) -> Result<String, ManifestError> {
    let mut v: Value = serde_json::from_str(text).map_err(|e| ManifestError(e.to_string()))?;
    for section in SECTIONS {
        if let Some(deps) = v.get_mut(section).and_then(Value::as_object_mut) {
            for spec in deps.values_mut() {
                let Some(path) = spec.as_str().and_then(relative_spec) else {
                    continue;
                };
                *spec = Value::String(format!("file:{}", job.join(path).display()));
            }
        }
    }
    v.as_object_mut().map(|o| o.remove("devDependencies"));
    serde_json::to_string_pretty(&v).map_err(|e| ManifestError(e.to_string()))
}

/// npm's command line in the jail: install the manifest in `prefix`; from the cache in
/// `offline` (an npm cache directory) and no registry when given.
pub fn npm_args(prefix: &Path, mirror: &str, offline: Option<&Path>) -> Vec<String> {
    let mut args: Vec<String> = [
        "install",
        "--no-audit",
        "--no-fund",
        "--no-update-notifier",
        "--omit=dev",
        // Local directories are copied, not linked: a link would lead out of the
        // generation (to the staged files, gone after the install).
        "--install-links",
        "--loglevel=warn",
        "--prefix",
    ]
    .map(String::from)
    .into();
    args.push(prefix.display().to_string());
    match offline {
        Some(cache) => {
            args.push("--offline".into());
            args.push("--cache".into());
            args.push(cache.display().to_string());
        }
        None => {
            args.push("--cache".into());
            args.push("/tmp/.npm".into());
            if !mirror.trim().is_empty() {
                args.push("--registry".into());
                args.push(mirror.trim().to_string());
            }
        }
    }
    args
}

/// The installer's code: npm's own command-line script, run by the jail's Node. An
/// offline cache is copied to the run's /tmp first: npm writes to its cache.
pub fn installer_code(npm_cli: &Path, args: &[String], offline: Option<(&Path, &Path)>) -> String {
    let copy = match offline {
        Some((from, to)) => format!(
            "require('fs').cpSync({}, {}, {{ recursive: true }});\n",
            json(&from.display().to_string()),
            json(&to.display().to_string())
        ),
        None => String::new(),
    };
    format!(
        "{copy}const env = {{ ...process.env }};\n\
         // The host's CA bundle (a proxy's own CA, say) for npm and any node a package\n\
         // script starts.\n\
         if (env.SSL_CERT_FILE) env.NODE_EXTRA_CA_CERTS = env.SSL_CERT_FILE;\n\
         const r = require('child_process').spawnSync(process.execPath, [{cli}, ...{args}], {{ stdio: 'inherit', env }});\n\
         if (r.error) {{ console.error('cannot start npm: ' + r.error.message); process.exitCode = 1; }}\n\
         else process.exitCode = r.status === null ? 1 : r.status;\n",
        cli = json(&npm_cli.display().to_string()),
        args = json(args),
    )
}

/// JSON text of a value, for embedding in generated code.
fn json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

/// Name and version of every package installed at the top of `prefix/node_modules`
/// (scoped ones too). What an installer left there is not trusted: links are not followed.
pub fn installed_in(prefix: &Path) -> Vec<Dependency> {
    let modules = prefix.join("node_modules");
    let mut dirs = Vec::new();
    for name in tree::real_dirs(&modules) {
        if name.starts_with('.') {
            continue;
        }
        if name.starts_with('@') {
            for inner in tree::real_dirs(&modules.join(&name)) {
                dirs.push(format!("{name}/{inner}"));
            }
        } else {
            dirs.push(name);
        }
    }
    let mut out: Vec<Dependency> = dirs
        .into_iter()
        .filter_map(|dir| {
            let text = tree::read_regular(&modules.join(&dir).join("package.json"))?;
            let v: Value = serde_json::from_str(&text).ok()?;
            Some(Dependency {
                name: v.get("name")?.as_str()?.to_string(),
                version: v.get("version")?.as_str()?.to_string(),
            })
        })
        .collect();
    out.sort_by_key(|d| d.name.to_lowercase());
    out
}

/// npm's command-line script (`npm-cli.js`) for the Node at `node`: the `npm` beside it,
/// else the one on PATH.
pub fn find_npm_cli(node: &Path) -> Option<PathBuf> {
    let beside = node.parent().map(|d| d.join("npm"));
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("npm"))
            .find(|p| p.exists())
    });
    [beside, on_path]
        .into_iter()
        .flatten()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .find(|p| p.file_name().is_some_and(|n| n == "npm-cli.js"))
        .or_else(|| {
            let lib = node
                .parent()?
                .parent()?
                .join("lib/node_modules/npm/bin/npm-cli.js");
            lib.is_file().then_some(lib)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn local_specs_are_found_and_pointed_at_the_staged_directory() {
        let text = r#"{"name":"x","dependencies":{"lodash":"^4","a":"file:./localpkg","b":"../up/b.tgz","c":"file:pkgs/c"},"devDependencies":{"jest":"*"}}"#;
        assert_eq!(
            local_paths(text),
            vec![
                PathBuf::from("./localpkg"),
                PathBuf::from("../up/b.tgz"),
                PathBuf::from("pkgs/c")
            ]
        );
        let manifest = manifest_for(text, Path::new("/job")).unwrap();
        let v: Value = serde_json::from_str(&manifest).unwrap();
        assert_eq!(v["dependencies"]["a"], "file:/job/./localpkg");
        assert_eq!(v["dependencies"]["c"], "file:/job/pkgs/c");
        assert_eq!(v["dependencies"]["lodash"], "^4");
        assert!(v.get("devDependencies").is_none());
        assert_eq!(requested(text).unwrap(), vec!["a", "b", "c", "lodash"]);
        assert!(requested("{").is_err());
        assert!(requested("").unwrap().is_empty());
    }

    #[test]
    fn installed_packages_are_read_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let nm = dir.path().join("node_modules");
        for (path, name, version) in [
            ("lodash", "lodash", "4.17.21"),
            ("@scope/pkg", "@scope/pkg", "1.0.0"),
        ] {
            fs::create_dir_all(nm.join(path)).unwrap();
            fs::write(
                nm.join(path).join("package.json"),
                format!(r#"{{"name":"{name}","version":"{version}"}}"#),
            )
            .unwrap();
        }
        fs::create_dir_all(nm.join(".bin")).unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(
            outside.path().join("package.json"),
            r#"{"name":"secret","version":"1"}"#,
        )
        .unwrap();
        std::os::unix::fs::symlink(outside.path(), nm.join("evil")).unwrap();
        let names: Vec<_> = installed_in(dir.path())
            .into_iter()
            .map(|d| format!("{}@{}", d.name, d.version))
            .collect();
        assert_eq!(names, vec!["@scope/pkg@1.0.0", "lodash@4.17.21"]);
    }

    #[test]
    fn the_installer_runs_npms_script_with_its_arguments() {
        let args = npm_args(Path::new("/tmp/out"), "http://m:4873", None);
        assert!(
            args.windows(2)
                .any(|w| w == ["--registry", "http://m:4873"])
        );
        let code = installer_code(Path::new("/usr/lib/npm/bin/npm-cli.js"), &args, None);
        assert!(code.contains("\"/usr/lib/npm/bin/npm-cli.js\""), "{code}");
        assert!(code.contains("\"--install-links\""), "{code}");
        let offline = npm_args(Path::new("/tmp/out"), "", Some(Path::new("/tmp/cache")));
        assert!(offline.contains(&"--offline".to_string()));
    }
}
