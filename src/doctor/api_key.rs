//! Whether the API key is the public default on a port others can reach.

use crate::config::{Config, DEFAULT_KEY};

use super::{Check, Status, check, ok};

pub(super) fn api_key_check(config: &Config) -> Check {
    let addr = config.listen_addr();
    if config.default_key_exposed() {
        return check(
            "api key",
            Status::Warning,
            format!(
                "the key is the public default `{DEFAULT_KEY}` and serve listens on {addr}: anyone who can reach port {} can run code",
                config.port
            ),
            Some(
                "set API_KEY (or app.key) to a long random secret, e.g. API_KEY=$(openssl rand -hex 32), and give Dify the same value as CODE_EXECUTION_API_KEY"
                    .into(),
            ),
        );
    }
    if config.key == DEFAULT_KEY {
        ok("api key", format!("the default key, on {addr} only"))
    } else {
        ok("api key", "a key other than the public default is set")
    }
}
