//! The answer every endpoint gives, `{"code", "message", "data"}`, and the `data` of a
//! run: one typed source for the server that writes them and the client
//! (`sandbox run --server`) that reads them.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// 0 on success, else -400 (bad request), -500 (internal) or -503 (busy).
    pub code: i32,
    pub message: String,
    /// `null` on failure.
    pub data: Option<T>,
}

impl<T> Envelope<T> {
    pub fn success(data: T) -> Self {
        Self {
            code: 0,
            message: "success".into(),
            data: Some(data),
        }
    }

    pub fn failure(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
        }
    }
}

/// The `data` of `POST /v1/sandbox/run`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunData {
    pub stdout: String,
    pub stderr: String,
    /// Empty when the program exited 0; else `process exited with code N`, stderr and
    /// the sandbox's note (see `engine::outcome`).
    pub error: String,
    pub exit_code: i32,
}

/// The `data` of the dependency endpoints that list packages.
#[derive(Debug, Clone, Serialize)]
pub struct DependencyList {
    pub dependencies: Vec<Dependency>,
}

/// A package a language's runs can import: Python's distributions, Node's packages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dependency {
    pub name: String,
    pub version: String,
}

/// An empty object, `{}`: the `data` of a successful dependency update.
#[derive(Debug, Clone, Serialize)]
pub struct Nothing {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_shape_is_the_original_services() {
        let ok = Envelope::success(RunData {
            stdout: "1\n".into(),
            stderr: String::new(),
            error: String::new(),
            exit_code: 0,
        });
        assert_eq!(
            serde_json::to_value(&ok).unwrap(),
            serde_json::json!({"code": 0, "message": "success",
                "data": {"stdout": "1\n", "stderr": "", "error": "", "exit_code": 0}})
        );
        let busy = Envelope::<RunData>::failure(-503, "Too many requests");
        assert_eq!(
            serde_json::to_string(&busy).unwrap(),
            r#"{"code":-503,"message":"Too many requests","data":null}"#
        );
        assert_eq!(
            serde_json::to_string(&Envelope::success(Nothing {})).unwrap(),
            r#"{"code":0,"message":"success","data":{}}"#
        );
    }

    #[test]
    fn a_client_reads_back_what_the_server_writes() {
        let text = r#"{"code":0,"message":"success","data":{"stdout":"a","stderr":"b","error":"","exit_code":3}}"#;
        let e: Envelope<RunData> = serde_json::from_str(text).unwrap();
        assert_eq!(
            e.data.map(|d| (d.stdout, d.exit_code)),
            Some(("a".into(), 3))
        );
        let e: Envelope<RunData> =
            serde_json::from_str(r#"{"code":-400,"message":"no","data":null}"#).unwrap();
        assert!(e.data.is_none());
    }
}
