//! Reading `/metrics` with a real OpenMetrics parser: Python's `prometheus_client`
//! (Debian's `python3-prometheus-client`, run as /usr/bin/python3), which rejects any
//! exposition that breaks the format (a missing `# EOF`, a counter without `_total`, a
//! malformed label, a histogram without its `+Inf` bucket, ...).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};

use serde::Deserialize;

/// One sample of the exposition.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Sample {
    /// The sample's name (e.g. `x_total`, `x_bucket`).
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

const PARSER: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append({"name": s.name, "labels": s.labels, "value": s.value})
json.dump(out, sys.stdout)
"#;

/// Parses `text` with the OpenMetrics parser; `Err` carries the parser's complaint.
pub fn parse_openmetrics(text: &str) -> Result<Vec<Sample>, String> {
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run /usr/bin/python3 (cargo xtask setup installs python3-prometheus-client): {e}"))?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// The samples of `name` whose labels include every `(key, value)` of `labels`.
pub fn samples<'a>(all: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    all.iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

/// The sum of the samples of `name` matching `labels`.
pub fn sum(all: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(all, name, labels).iter().map(|s| s.value).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let ok = "# TYPE a counter\na_total{x=\"1\"} 3\n# EOF\n";
        let s = parse_openmetrics(ok).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(sum(&s, "a_total", &[("x", "1")]), 3.0);
        assert!(
            parse_openmetrics("# TYPE a counter\na_total 3\n").is_err(),
            "no # EOF"
        );
        assert!(
            parse_openmetrics("# TYPE a counter\na 3\n# EOF\n").is_err(),
            "no _total"
        );
    }
}
