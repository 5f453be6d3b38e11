//! The human-readable form of a report.

use super::{Report, Status};

/// Human output: one line per check, its fix below it; colour only on a terminal.
pub(crate) fn render(report: &Report, colour: bool) -> String {
    let paint = |code: &str, text: &str| {
        if colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    };
    let width = report
        .checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    out.push_str(&format!(
        "host: {} (fixes use {})\n",
        report.distribution,
        report.package_manager.as_str()
    ));
    for c in &report.checks {
        let tag = match c.status {
            Status::Ok => paint("32", "ok     "),
            Status::Warning => paint("33", "warning"),
            Status::Failed => paint("31;1", "failed "),
        };
        out.push_str(&format!("{tag}  {:width$}  {}\n", c.name, c.detail));
        if let Some(fix) = &c.fix
            && c.status != Status::Ok
        {
            out.push_str(&format!("         {:width$}  fix: {fix}\n", ""));
        }
    }
    match (&report.isolation, &report.isolation_error) {
        (Some(level), _) => out.push_str(&format!("serve would isolate runs with: {level}\n")),
        (None, Some(e)) => out.push_str(&format!("serve could not start here: {e}\n")),
        (None, None) => out.push_str("serve could not start here\n"),
    }
    if let Some(network) = &report.network {
        out.push_str(&format!("networked runs get: {network}\n"));
    }
    let failed = report
        .checks
        .iter()
        .filter(|c| c.status == Status::Failed)
        .count();
    let summary = if failed == 0 {
        paint("32", "all required checks passed")
    } else {
        paint("31;1", &format!("{failed} required check(s) failed"))
    };
    out.push_str(&summary);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::packages::PackageManager;
    use crate::doctor::{check, ok};

    #[test]
    fn plain_output_has_no_colour_codes() {
        let report = Report {
            distribution: "Debian".into(),
            package_manager: PackageManager::Apt,
            checks: vec![
                ok("a", "fine"),
                check("b", Status::Failed, "broken", Some("do this".into())),
            ],
            isolation: None,
            isolation_error: Some("not root".into()),
            network: None,
            ok: false,
        };
        let plain = render(&report, false);
        assert!(!plain.contains('\x1b'), "{plain}");
        assert!(plain.contains("failed   b  broken"), "{plain}");
        assert!(plain.contains("fix: do this"), "{plain}");
        assert!(render(&report, true).contains("\x1b[31;1m"));
    }
}
