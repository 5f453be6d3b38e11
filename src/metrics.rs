//! Prometheus metrics for `GET /metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub language: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LanguageLabel {
    pub language: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub language: String,
    pub network: String,
}

/// Runs that did not end as they reported, counted by the engine as it finds them (the
/// registry shares these counters).
#[derive(Clone, Debug, Default)]
pub struct FalseEnds {
    /// Announced an exit status, then exited otherwise.
    pub misreported: Counter,
    /// Still running after the answer went out on their announced end, and killed.
    pub killed_after_answer: Counter,
}

pub struct Metrics {
    registry: Registry,
    pub runs: Family<RunLabels, Counter>,
    pub duration: Family<LanguageLabel, Histogram>,
    pub in_flight: Gauge,
    pub queued: Gauge,
    pub warm: Family<PoolLabels, Gauge>,
    pub background: Gauge,
    pub kept_namespaces: Gauge,
    /// Per language: installs gone live since start, packages live, last install's result.
    pub packages_generation: Family<LanguageLabel, Gauge>,
    pub packages_installed: Family<LanguageLabel, Gauge>,
    pub packages_last_install_ok: Family<LanguageLabel, Gauge>,
}

impl Metrics {
    pub fn new(false_ends: &FalseEnds) -> Self {
        let mut registry = Registry::with_prefix("sandbox");
        registry.register(
            "runs_misreported_end",
            "Runs that announced an exit status and then ended otherwise (their network namespace is not reused)",
            false_ends.misreported.clone(),
        );
        registry.register(
            "runs_killed_after_answer",
            "Runs still running after they were answered on their announced end, killed by the server",
            false_ends.killed_after_answer.clone(),
        );
        let runs = Family::<RunLabels, Counter>::default();
        registry.register(
            "runs",
            "Runs by language and outcome (ok, error, timeout, memory, output, processes, disk, rejected, invalid, internal)",
            runs.clone(),
        );
        let duration = Family::<LanguageLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ])
        });
        registry.register(
            "run_duration_seconds",
            "Time from request to answer of runs that executed",
            duration.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Run requests admitted and not yet answered",
            in_flight.clone(),
        );
        let queued = Gauge::default();
        registry.register(
            "queue_length",
            "Runs waiting for one of max_workers slots",
            queued.clone(),
        );
        let warm = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "warm_workers",
            "Jailed interpreters ready for a run",
            warm.clone(),
        );
        let background = Gauge::default();
        registry.register(
            "background_tasks",
            "Clean-ups of finished runs and warm workers being started",
            background.clone(),
        );
        let kept_namespaces = Gauge::default();
        registry.register(
            "network_namespaces_kept",
            "Network namespaces their runs left untouched, kept for the next networked run",
            kept_namespaces.clone(),
        );
        let packages_generation = Family::<LanguageLabel, Gauge>::default();
        registry.register(
            "packages_generation",
            "Package installs gone live since the server started, per language",
            packages_generation.clone(),
        );
        let packages_installed = Family::<LanguageLabel, Gauge>::default();
        registry.register(
            "packages_installed",
            "Extra packages in the live generation, per language",
            packages_installed.clone(),
        );
        let packages_last_install_ok = Family::<LanguageLabel, Gauge>::default();
        registry.register(
            "packages_last_install_ok",
            "Whether the last package install went live (1) or failed and the previous set stayed (0); absent before the first install",
            packages_last_install_ok.clone(),
        );
        Self {
            registry,
            runs,
            duration,
            in_flight,
            queued,
            warm,
            background,
            kept_namespaces,
            packages_generation,
            packages_installed,
            packages_last_install_ok,
        }
    }

    pub fn count(&self, language: &str, outcome: &str) {
        self.runs
            .get_or_create(&RunLabels {
                language: language.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
