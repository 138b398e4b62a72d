//! The agent's HTTP endpoint (`--metrics-addr`) as a client in a namespace
//! sees it, and the samples of its OpenMetrics text.

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::netns::in_netns;

/// `GET path` on `addr` from namespace `ns`: the status code and the body.
pub fn http_get(ns: &str, addr: SocketAddrV4, path: &str) -> Result<(u16, String)> {
    let stream = in_netns(ns, move || {
        TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2))
    })?
    .with_context(|| format!("connecting to {addr}"))?;
    let mut stream = stream;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP header in {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    // Bodies are small: hyper sends them whole, with a Content-Length.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("unexpected chunked body");
    }
    Ok((status, body.to_owned()))
}

/// The sum of the samples of `name` whose labels include every one of
/// `labels`; `None` when there is none.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let has = |(k, v): &(&str, &str)| {
            series_labels
                .split(',')
                .any(|pair| pair == format!("{k}=\"{v}\""))
        };
        if labels.iter().all(has) {
            let value: f64 = value.parse().ok()?;
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::sample;

    #[test]
    fn samples_are_matched_by_name_and_summed_over_matching_labels() {
        let text = "# TYPE x counter\n\
                    x_total{a=\"1\",b=\"2\"} 3\n\
                    x_total{a=\"1\",b=\"3\"} 4\n\
                    x_totals{a=\"1\"} 100\n\
                    y 5\n# EOF\n";
        assert_eq!(sample(text, "x_total", &[("a", "1")]), Some(7.0));
        assert_eq!(sample(text, "x_total", &[("b", "3")]), Some(4.0));
        assert_eq!(sample(text, "x_total", &[("b", "4")]), None);
        assert_eq!(sample(text, "y", &[]), Some(5.0));
    }
}
