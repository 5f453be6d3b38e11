//! Every run's limits, as the configuration sets them (`Config::run_limits`): what the
//! plan applies and what the answer's note quotes.

use std::time::Duration;

/// Every run's limits, from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunLimits {
    pub timeout: Duration,
    pub memory_mb: u64,
    pub max_processes: u64,
    pub max_output_bytes: usize,
    pub tmp_mb: u64,
}
