//! Configuration errors: each names the key and value and exits with code 2.

#![cfg(target_os = "linux")]

mod common;

use common::{sandbox, stderr, stdout};

fn write_config(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

#[test]
fn malformed_yaml_exits_2_naming_the_file() {
    let f = write_config("app:\n  port: [8194\n");
    let o = sandbox(&["serve", "--config", f.path().to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(f.path().to_str().unwrap()),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("not valid YAML"), "{}", stderr(&o));
}

#[test]
fn a_wrong_type_in_the_file_exits_2() {
    let f = write_config("max_workers: many\n");
    let o = sandbox(&["serve", "--config", f.path().to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("max_workers"), "{}", stderr(&o));
}

#[test]
fn a_missing_config_file_exits_2() {
    let o = sandbox(&["serve", "--config", "/nonexistent/sandbox.yaml"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("/nonexistent/sandbox.yaml"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_non_numeric_environment_variable_exits_2() {
    for (var, value) in [
        ("MAX_WORKERS", "four"),
        ("WORKER_TIMEOUT", "-3"),
        ("SANDBOX_PORT", "99999"),
        ("ENABLE_NETWORK", "perhaps"),
    ] {
        let o = sandbox(&["serve"], &[(var, value)]);
        assert_eq!(o.status.code(), Some(2), "{var}={value}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(var) && stderr(&o).contains(value),
            "{}",
            stderr(&o)
        );
    }
}

#[test]
fn an_interpreter_that_does_not_run_exits_2() {
    let o = sandbox(&["serve"], &[("PYTHON_PATH", "/nonexistent/python3")]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("/nonexistent/python3") && stderr(&o).contains("PYTHON_PATH"),
        "{}",
        stderr(&o)
    );
    let o = sandbox(&["serve"], &[("NODEJS_PATH", "/bin/false")]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("NODEJS_PATH"), "{}", stderr(&o));
}

#[test]
fn unknown_keys_warn_but_do_not_stop() {
    let f = write_config("worker_timeout: 5\nworker_timout: 9\n");
    let o = sandbox(
        &[
            "run",
            "--config",
            f.path().to_str().unwrap(),
            "-l",
            "python3",
            "-e",
            "print(42)",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "42\n");
    assert!(
        stderr(&o).contains("unknown configuration key `worker_timout`"),
        "{}",
        stderr(&o)
    );
}
