//! The body of `POST /v1/sandbox/run`: read up to the limit, then JSON, form or query
//! encoded, with messages that name the field that is wrong.

use axum::body::{Body, Bytes};
use axum::http::HeaderMap;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::Value;

use super::{ApiError, MAX_BODY_BYTES};

/// What an unreadable body is told.
const ACCEPTED: &str = "send a JSON object (Content-Type: application/json), a form (application/x-www-form-urlencoded) or the fields as query parameters";

/// The body, up to `MAX_BODY_BYTES`: a larger one is refused on its declared length
/// before any of it is read, or as soon as it passes the limit.
/// How long a request's body may take to arrive once the request is admitted.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(ApiError::too_large());
    }
    // An admitted request holds one of max_requests: a body trickled in slowly must not
    // hold it for ever.
    let collected =
        tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY_BYTES).collect())
            .await
            .map_err(|_| {
                ApiError::bad_request(format!(
                    "the request body did not arrive within {} s; send it at once",
                    BODY_TIMEOUT.as_secs()
                ))
            })?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::too_large()),
        Err(e) => Err(ApiError::bad_request(format!(
            "the request body could not be read: {e}; send it again"
        ))),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunBody {
    pub language: String,
    pub code: String,
    pub preload: String,
    pub enable_network: bool,
    /// Not Dify's: answer only once the run's last process is gone (`sandbox run
    /// --server`), with the status it really ended with.
    pub wait_for_exit: bool,
}

fn missing(field: &str) -> ApiError {
    ApiError::bad_request(format!("missing field `{field}`: it is required"))
}

fn wrong_type(field: &str, expected: &str) -> ApiError {
    ApiError::bad_request(format!("field `{field}` must be {expected}"))
}

fn parse_bool(field: &str, v: &str) -> Result<bool, ApiError> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "on" | "yes" => Ok(true),
        "false" | "0" | "off" | "no" | "" => Ok(false),
        _ => Err(wrong_type(field, "true or false")),
    }
}

impl RunBody {
    pub fn parse(
        content_type: &str,
        body: &[u8],
        query: &[(String, String)],
    ) -> Result<Self, ApiError> {
        let mime = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let form = mime == "application/x-www-form-urlencoded";
        // Clients send JSON under text/plain or no type at all; an object is JSON
        // whatever the header says, unless the header says form.
        let looks_json = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        if mime == "application/json" || (!form && looks_json) {
            return Self::from_json(body);
        }
        let mut pairs: Vec<(String, String)> = query.to_vec();
        if !body.is_empty() {
            let fields: Vec<(String, String)> =
                serde_urlencoded::from_bytes(body).map_err(|e| {
                    ApiError::bad_request(format!(
                        "the request body is not a valid form: {e}; {ACCEPTED}"
                    ))
                })?;
            pairs.extend(fields);
        }
        let parsed = Self::from_pairs(&pairs);
        if form || body.is_empty() {
            return parsed;
        }
        // Neither JSON nor declared a form: the missing field is most likely the
        // encoding's fault, so say which encodings are read.
        parsed.map_err(|e| {
            let declared = if mime.is_empty() { "none" } else { &mime };
            ApiError::bad_request(format!(
                "{}. The body is not a JSON object and its Content-Type ({declared}) is not one this server reads: {ACCEPTED}",
                e.message
            ))
        })
    }

    fn from_json(body: &[u8]) -> Result<Self, ApiError> {
        let v: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!(
                "the request body is not valid JSON: {e}; {ACCEPTED}"
            ))
        })?;
        let obj = v
            .as_object()
            .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object"))?;
        let string = |field: &str, required: bool| -> Result<String, ApiError> {
            match obj.get(field) {
                None | Some(Value::Null) if required => Err(missing(field)),
                None | Some(Value::Null) => Ok(String::new()),
                Some(Value::String(s)) if required && s.is_empty() => Err(missing(field)),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(wrong_type(field, "a string")),
            }
        };
        let flag = |field: &str| match obj.get(field) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::String(s)) => parse_bool(field, s),
            Some(_) => Err(wrong_type(field, "true or false")),
        };
        Ok(Self {
            language: string("language", true)?,
            code: string("code", true)?,
            preload: string("preload", false)?,
            enable_network: flag("enable_network")?,
            wait_for_exit: flag("wait_for_exit")?,
        })
    }

    fn from_pairs(pairs: &[(String, String)]) -> Result<Self, ApiError> {
        let get = |k: &str| {
            pairs
                .iter()
                .rev()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let required = |k: &str| get(k).filter(|v| !v.is_empty()).ok_or_else(|| missing(k));
        let flag = |k: &str| get(k).map_or(Ok(false), |v| parse_bool(k, &v));
        Ok(Self {
            language: required("language")?,
            code: required("code")?,
            preload: get("preload").unwrap_or_default(),
            enable_network: flag("enable_network")?,
            wait_for_exit: flag("wait_for_exit")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_form_and_query_bodies_parse_alike() {
        let json = RunBody::parse(
            "application/json",
            br#"{"language":"python3","code":"print(1)","enable_network":true,"dependencies":[]}"#,
            &[],
        )
        .expect("json");
        let form = RunBody::parse(
            "application/x-www-form-urlencoded",
            b"language=python3&code=print%281%29&enable_network=true",
            &[],
        )
        .expect("form");
        let query = RunBody::parse(
            "",
            b"",
            &[
                ("language".into(), "python3".into()),
                ("code".into(), "print(1)".into()),
                ("enable_network".into(), "true".into()),
            ],
        )
        .expect("query");
        assert_eq!(json, form);
        assert_eq!(form, query);
    }

    #[test]
    fn errors_name_the_field() {
        let e = RunBody::parse("application/json", br#"{"language":"python3"}"#, &[]).unwrap_err();
        assert!(e.message.contains("`code`"), "{}", e.message);
        let e =
            RunBody::parse("application/json", br#"{"language":3,"code":"x"}"#, &[]).unwrap_err();
        assert!(e.message.contains("`language`"), "{}", e.message);
        let e = RunBody::parse("application/json", b"{nope", &[]).unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = RunBody::parse(
            "application/json",
            br#"{"language":"python3","code":"x","enable_network":"maybe"}"#,
            &[],
        )
        .unwrap_err();
        assert!(e.message.contains("enable_network"), "{}", e.message);
    }

    #[test]
    fn an_object_is_json_whatever_the_type_says_unless_it_says_form() {
        let body = b" \n{\"language\":\"python3\",\"code\":\"print(1)\"}";
        for content_type in ["text/plain", "", "application/octet-stream; charset=utf-8"] {
            let r = RunBody::parse(content_type, body, &[]).expect(content_type);
            assert_eq!(
                (r.language.as_str(), r.code.as_str()),
                ("python3", "print(1)")
            );
        }
        let e = RunBody::parse("application/x-www-form-urlencoded", body, &[]).unwrap_err();
        assert!(e.message.contains("`language`"), "{}", e.message);
    }

    #[test]
    fn an_unreadable_body_names_the_accepted_types() {
        let e = RunBody::parse("text/plain", b"print(1)", &[]).unwrap_err();
        assert!(
            e.message.contains("application/json")
                && e.message.contains("application/x-www-form-urlencoded")
                && e.message.contains("text/plain"),
            "{}",
            e.message
        );
        let e = RunBody::parse("application/json", b"{nope", &[]).unwrap_err();
        assert!(e.message.contains("application/json"), "{}", e.message);
    }
}
