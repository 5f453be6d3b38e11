//! What the benchmarks share: Dify's request bodies, a real `sandbox serve`, and
//! readings of /proc. Each bench target uses only part of it.
#![allow(dead_code)]

pub mod payloads;
pub mod procfs;
pub mod server;

/// The `p` quantile (0..=1) of sorted values; NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// At most `max` characters of `s`, for messages that quote an answer.
pub fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let head: String = s.chars().take(max).collect();
    format!("{head}...")
}
