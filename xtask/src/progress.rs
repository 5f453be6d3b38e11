//! One spinner per phase, with the build's own output printed above it.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A phase of the work (image, compile, copy) shown as a spinner.
pub struct Phase {
    bar: ProgressBar,
    name: &'static str,
    started: Instant,
}

impl Phase {
    pub fn start(name: &'static str, message: impl Into<String>) -> Self {
        let bar = ProgressBar::new_spinner();
        // Template is a constant; it only fails to parse if it is edited wrongly.
        if let Ok(style) =
            ProgressStyle::with_template("{spinner:.cyan} {prefix:.bold} [{elapsed}] {wide_msg}")
        {
            bar.set_style(style);
        }
        bar.set_prefix(name);
        let message = message.into();
        bar.set_message(message.clone());
        if bar.is_hidden() {
            // No terminal (CI, pipes): say what is happening on a plain line.
            eprintln!("==> {name}: {message}");
        } else {
            bar.enable_steady_tick(Duration::from_millis(120));
        }
        Phase {
            bar,
            name,
            started: Instant::now(),
        }
    }

    pub fn set_message(&self, message: impl Into<String>) {
        self.bar.set_message(message.into());
    }

    /// Prints a line above the spinner. indicatif drops `println` on a hidden
    /// bar, so without a terminal the line goes straight to stderr.
    pub fn println(&self, line: impl AsRef<str>) {
        if self.bar.is_hidden() {
            eprintln!("{}", line.as_ref());
        } else {
            self.bar.println(line.as_ref());
        }
    }

    pub fn finish(self, message: impl Into<String>) {
        let message = format!(
            "{} ({:.1}s)",
            message.into(),
            self.started.elapsed().as_secs_f64()
        );
        if self.bar.is_hidden() {
            eprintln!("==> {}: {message}", self.name);
        }
        self.bar.set_style(finished_style("✔"));
        self.bar.finish_with_message(message);
    }

    pub fn fail(self, message: impl Into<String>) {
        let message = message.into();
        if self.bar.is_hidden() {
            eprintln!("==> {}: {message}", self.name);
        }
        self.bar.set_style(finished_style("✘"));
        self.bar.abandon_with_message(message);
    }
}

fn finished_style(mark: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!("{mark} {{prefix:.bold}} {{wide_msg}}"))
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

/// Human-readable size, e.g. `12.3 MiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::human_size(512), "512 B");
        assert_eq!(super::human_size(1536), "1.5 KiB");
        assert_eq!(super::human_size(12 * 1024 * 1024), "12.0 MiB");
    }
}
