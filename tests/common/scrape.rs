//! Reading a relay's `/metrics`: the scrape, its samples, one value.

use super::*;

/// Sample values of a scrape: "name{labels}" → value, labels in scrape order.
pub fn samples(scrape: &str) -> Vec<(String, String, f64)> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n.to_string(), rest.trim_end_matches('}').to_string()),
                None => (series.to_string(), String::new()),
            };
            Some((name, labels, value.parse().ok()?))
        })
        .collect()
}

/// The value of `name` whose labels contain every `want` pair.
pub fn metric_value(scrape: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    samples(scrape)
        .into_iter()
        .find(|(n, labels, _)| n == name && want.iter().all(|(k, v)| labels.contains(&format!("{k}=\"{v}\""))))
        .map(|(_, _, v)| v)
}

pub async fn scrape(relay: &RelayProcess) -> String {
    match relay.http_get("/metrics").await {
        Some((200, body)) => body,
        other => {
            let lines = relay.lines();
            let tail = &lines[lines.len().saturating_sub(20)..];
            panic!("/metrics answered {other:?}; the relay's last lines: {tail:#?}")
        }
    }
}
