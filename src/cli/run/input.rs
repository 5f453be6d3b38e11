//! The snippet to run: from a file, stdin (`-`) or `--eval`, and its language.

use std::io::Read;

use anyhow::{Context, bail};

use super::{MAX_CODE_BYTES, RunArgs};
use crate::protocol::Language;

pub(super) fn read_code(args: &RunArgs) -> anyhow::Result<(Language, String)> {
    let from_ext = args.file.as_deref().and_then(Language::from_extension);
    let language = match &args.language {
        Some(name) => Language::parse(name)
            .with_context(|| format!("unsupported language {name:?}: use python3 or nodejs"))?,
        None => from_ext.with_context(|| match &args.file {
            Some(f) if f.as_os_str() != "-" => format!(
                "cannot tell the language of {}: name it .py or .js, or pass --language python3 or --language nodejs",
                f.display()
            ),
            _ => "cannot tell the language: pass --language python3 or --language nodejs".into(),
        })?,
    };
    let code = match (&args.eval, &args.file) {
        (Some(code), None) => code.clone(),
        (Some(_), Some(_)) => bail!("give either a file or --eval, not both"),
        (None, None) => bail!("nothing to run: give a file, `-` for stdin, or --eval CODE"),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .take(MAX_CODE_BYTES + 1)
                .read_to_end(&mut bytes)
                .context("cannot read the snippet from stdin")?;
            String::from_utf8(bytes)
                .map_err(|_| anyhow::anyhow!("the snippet on stdin is not UTF-8 text"))?
        }
        (None, Some(path)) => {
            let meta = std::fs::metadata(path).with_context(|| {
                format!(
                    "cannot read {}: check the path and its permissions",
                    path.display()
                )
            })?;
            if meta.is_dir() {
                bail!("{} is a directory, not a snippet file", path.display());
            }
            if meta.len() > MAX_CODE_BYTES {
                bail!(
                    "{} is {} bytes; snippets are limited to {MAX_CODE_BYTES} bytes",
                    path.display(),
                    meta.len()
                );
            }
            let bytes = std::fs::read(path).with_context(|| {
                format!("cannot read {}: check its permissions", path.display())
            })?;
            String::from_utf8(bytes).map_err(|_| {
                anyhow::anyhow!("{} is not UTF-8 text; save it as UTF-8", path.display())
            })?
        }
    };
    if code.len() as u64 > MAX_CODE_BYTES {
        bail!(
            "the snippet is more than {MAX_CODE_BYTES} bytes; snippets are limited to {MAX_CODE_BYTES} bytes"
        );
    }
    Ok((language, code))
}
