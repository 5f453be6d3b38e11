//! One real run of a language, jailed as every run is: what `sandbox doctor` tries, so an
//! interpreter that starts on the host but not in the jail (its files out of the run's
//! reach, a memory or process limit below what it needs) is caught before a user meets
//! it.

use super::{Engine, RunError, RunRequest};
use crate::runtime::Language;

/// What the probe prints.
const PRINTED: &str = "sandbox-probe\n";

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("the interpreter does not start in the jail: {0}")]
    Start(#[from] RunError),
    #[error("the interpreter does not run a snippet in the jail (exit code {code}): {error}")]
    Run { code: i32, error: String },
}

impl ProbeError {
    /// What to look at, for `language`.
    pub fn fix(language: Language) -> String {
        format!(
            "check that {} starts with memory_limit_mb and max_processes as configured, and that its files are readable by other users (the run's uid)",
            match language {
                Language::Python3 => "python_path (PYTHON_PATH)",
                Language::Nodejs => "nodejs_path (NODEJS_PATH)",
            }
        )
    }
}

impl Engine {
    /// Run a snippet that prints one line in `language`, and check that it did.
    pub async fn probe(&self, language: Language) -> Result<(), ProbeError> {
        let code = match language {
            Language::Python3 => "print('sandbox-probe')",
            Language::Nodejs => "console.log('sandbox-probe')",
        };
        let o = self
            .execute(RunRequest {
                language,
                code: code.into(),
                preload: String::new(),
                network: false,
                sink: None,
                invocation: Default::default(),
                stdin: None,
                files: Default::default(),
                wait_for_exit: true,
                cancel: None,
            })
            .await?;
        if o.exit_code == 0 && o.stdout == PRINTED {
            Ok(())
        } else {
            Err(ProbeError::Run {
                code: o.exit_code,
                error: o.error.trim().to_string(),
            })
        }
    }
}
