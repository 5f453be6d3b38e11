//! How a snippet is invoked beyond its code (its file name, argv and environment), as
//! `sandbox run` sends it and the jail applies it.

/// How the snippet is invoked, beyond its code: what `sandbox run` gives it. Dify's runs
/// leave it empty and get exactly what they always got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Invocation {
    /// The name the code is compiled under (tracebacks, `__file__`); an absolute path
    /// also makes its directory the first place modules are imported from.
    pub filename: String,
    /// The snippet's argv, its script's name first (`sys.argv`, `process.argv[1..]`).
    pub argv: Vec<String>,
    /// Variables set in the snippet's environment (checked with [`check_variable`]).
    pub env: Vec<(String, String)>,
}

/// Why a variable cannot be set in a run's environment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadVariable {
    #[error("an environment variable needs a name: write NAME=VALUE")]
    NoName,
    #[error("{0:?} cannot be an environment variable's name: names hold neither '=' nor NUL")]
    Name(String),
    #[error("the value of {0} holds a NUL byte, which no environment can carry")]
    NulInValue(String),
}

/// Whether `name=value` can be set in a run's environment: a name that is not empty and
/// holds neither `=` nor NUL, a value without NUL (the C environment cannot hold them).
pub fn check_variable(name: &str, value: &str) -> Result<(), BadVariable> {
    if name.is_empty() {
        return Err(BadVariable::NoName);
    }
    if name.contains('=') || name.contains('\0') {
        return Err(BadVariable::Name(name.into()));
    }
    if value.contains('\0') {
        return Err(BadVariable::NulInValue(name.into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_the_environment_cannot_hold_are_refused() {
        assert!(check_variable("MODE", "ci").is_ok());
        assert!(check_variable("PYTHONPATH", "/x").is_ok());
        assert!(check_variable("lower_1", "").is_ok());
        for (name, value, kind, needle) in [
            ("", "x", BadVariable::NoName, "needs a name"),
            (
                "A=B",
                "x",
                BadVariable::Name("A=B".into()),
                "neither '=' nor NUL",
            ),
            (
                "A\0B",
                "x",
                BadVariable::Name("A\0B".into()),
                "neither '=' nor NUL",
            ),
            ("A", "x\0y", BadVariable::NulInValue("A".into()), "NUL byte"),
        ] {
            let e = check_variable(name, value).expect_err(name);
            assert_eq!(e, kind);
            assert!(e.to_string().contains(needle), "{e}");
        }
    }
}
