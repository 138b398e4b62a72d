//! The throughput plot: delivered Mpps against the number of services,
//! one line per system and family (IPv6 dotted), as SVG.

use std::fmt::Write as _;

use crate::results::{Family, Load, Results, System, Traffic};

/// Delivered Mpps vs number of services, one line per system and family
/// (SVG). IPv6 lines are dotted, in their system's colour; the ceiling is
/// drawn for IPv4 only (IPv6's is the same redirect).
pub fn plot(results: &Results) -> String {
    let (w, h, l, r, t, b) = (640.0, 400.0, 60.0, 130.0, 30.0, 50.0);
    let rows = &results.throughput;
    let pts = |system: System, family: Family| -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = rows
            .iter()
            .filter(|x| {
                x.system == system
                    && x.family == family
                    && x.traffic == Traffic::UdpManyFlows
                    && x.load == Load::Overload
            })
            .map(|x| (f64::from(x.services), x.delivered_pps / 1e6))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    };
    let max_y = rows.iter().map(|x| x.delivered_pps).fold(0.1f64, f64::max) / 1e6 * 1.1;
    let max_x = rows
        .iter()
        .map(|x| f64::from(x.services))
        .fold(1.0f64, f64::max)
        .max(10.0);
    let sx = |x: f64| l + (x.max(1.0).log10() / max_x.log10()) * (w - l - r);
    let sy = |y: f64| h - b - y / max_y * (h - t - b);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"18\" text-anchor=\"middle\">Delivered Mpps vs services (UDP, 60k flows, overload; dotted: IPv6)</text>",
        w / 2.0
    );
    let _ = writeln!(
        s,
        "<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{}\" stroke=\"black\"/>",
        h - b,
        w - r,
        h - b,
        h - b
    );
    let mut x = 1.0;
    while x <= max_x {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x}</text>",
            sx(x),
            h - b + 16.0
        );
        x *= 10.0;
    }
    for i in 0..=4 {
        let y = max_y * i as f64 / 4.0;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{y:.1}</text>",
            l - 6.0,
            sy(y) + 4.0
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">services (log)</text>",
        (l + w - r) / 2.0,
        h - 12.0
    );
    let lines = [
        (System::Xlb, "#d62728"),
        (System::Iptables, "#1f77b4"),
        (System::Nftables, "#2ca02c"),
        (System::KlipperTwoHop, "#9467bd"),
        (System::Ceiling, "#7f7f7f"),
        (System::Forwarder, "#ff7f0e"),
    ]
    .into_iter()
    .flat_map(|(system, color)| Family::ALL.map(|family| (system, family, color)))
    .filter(|&(system, family, _)| !(system.is_limit() && family == Family::V6));
    let mut legend = 0;
    for (system, family, color) in lines {
        let mut p = pts(system, family);
        if system.is_limit()
            && let Some(c) = p.first().copied()
        {
            p = vec![(1.0, c.1), (max_x, c.1)];
        }
        if p.is_empty() {
            continue;
        }
        let path: Vec<String> = p
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let dash = match (system, family) {
            (System::Ceiling | System::Forwarder, _) => " stroke-dasharray=\"6,4\"",
            (_, Family::V6) => " stroke-dasharray=\"2,3\"",
            _ => "",
        };
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash} points=\"{}\"/>",
            path.join(" ")
        );
        for (x, y) in &p {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\" stroke=\"{color}\"/>",
                sx(*x),
                sy(*y),
                if family == Family::V6 { "white" } else { color }
            );
        }
        let label = match (family, system) {
            (Family::V4, _) => system.name().to_string(),
            (Family::V6, System::Iptables) => family.system_name(system).to_string(),
            (Family::V6, _) => format!("{} IPv6", system.name()),
        };
        // The legend shows each line's stroke, then its name.
        let y = t + 20.0 + legend as f64 * 18.0;
        let _ = writeln!(
            s,
            "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/><text x=\"{}\" y=\"{y}\" fill=\"{color}\">{label}</text>",
            w - r + 6.0,
            y - 4.0,
            w - r + 26.0,
            y - 4.0,
            w - r + 30.0,
        );
        legend += 1;
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IPv6 lines are dotted and named in the legend; the ceiling is drawn
    /// once.
    #[test]
    fn ipv6_lines_are_dotted_and_named() {
        let text = include_str!("../../../docs/benchmarks.json");
        // The committed run has both families.
        let results: Results = serde_json::from_str(text).unwrap();
        let svg = plot(&results);
        for label in [
            ">xlb<",
            ">xlb IPv6<",
            ">ip6tables<",
            ">nftables IPv6<",
            ">ceiling<",
        ] {
            assert!(svg.contains(label), "{label} missing: {svg}");
        }
        assert!(!svg.contains("ceiling IPv6"));
        // Lines and legend strokes: three IPv6 systems, each twice.
        assert_eq!(svg.matches("stroke-dasharray=\"2,3\"").count(), 6, "{svg}");
    }
}
