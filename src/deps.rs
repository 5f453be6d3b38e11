//! Extra Python packages: the requirements file and what the interpreter really has
//! installed of it (name and version from the package metadata).

use std::path::Path;

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dependency {
    pub name: String,
    pub version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DepsError {
    #[error(
        "cannot read the requirements file {path}: {source}. Create it (pip format) or set dependencies_path"
    )]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not ask {python} for installed versions: {reason}")]
    Query { python: String, reason: String },
}

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

const VERSIONS: &str = r#"
import sys, json
from importlib import metadata
out = []
for name in sys.argv[1:]:
    try:
        out.append({"name": name, "version": metadata.version(name)})
    except metadata.PackageNotFoundError:
        pass
print(json.dumps(out))
"#;

/// Installed versions of the packages the requirements file names. A missing file is an
/// empty list (nothing extra requested).
pub fn list(python: &Path, requirements: &Path) -> Result<Vec<Dependency>, DepsError> {
    let text = match std::fs::read_to_string(requirements) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(DepsError::Read {
                path: requirements.display().to_string(),
                source,
            });
        }
    };
    let names = requirement_names(&text);
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let query = |reason: String| DepsError::Query {
        python: python.display().to_string(),
        reason,
    };
    let out = std::process::Command::new(python)
        .arg("-I")
        .arg("-c")
        .arg(VERSIONS)
        .args(&names)
        .output()
        .map_err(|e| query(e.to_string()))?;
    if !out.status.success() {
        return Err(query(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    #[derive(serde::Deserialize)]
    struct Row {
        name: String,
        version: String,
    }
    let rows: Vec<Row> = serde_json::from_slice(&out.stdout).map_err(|e| query(e.to_string()))?;
    Ok(rows
        .into_iter()
        .map(|r| Dependency {
            name: r.name,
            version: r.version,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirement_lines_yield_names() {
        let text = "# comment\njinja2>=3.0\nrequests==2.31.0 ; python_version>'3'\n-r other.txt\n\nhttpx[http2]\nmy_pkg.sub\n";
        assert_eq!(
            requirement_names(text),
            vec!["jinja2", "requests", "httpx", "my_pkg.sub"]
        );
    }
}
