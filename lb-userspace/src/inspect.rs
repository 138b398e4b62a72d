//! `xlb inspect`: the live maps, read from their pins, as tables or JSON.

use std::net::{IpAddr, SocketAddr};

use anyhow::Result;
use lb_common::{
    BACKEND_F_LOCAL, BACKEND_F_TERMINATING, FLOW_F_ANSWERED, FLOW_F_CLOSING, FLOW_F_REPLY,
    FLOW_F_SNAT, Flow, FlowKey, SERVICE_F_AFFINITY, SERVICE_F_LOCAL_ONLY, SERVICE_F_SOURCE_RANGES,
};
use serde_json::{Value, json};

use crate::{
    dataplane::Maps,
    encode::{addr_from16, frontend_from_key},
    model::Protocol,
    netdev,
    state_file::FrontendInfo,
};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum What {
    Services,
    Backends,
    Flows,
    Stats,
    /// The addresses this node announces on L2 (answers ARP/NDP for).
    L2,
    /// BGP sessions and the routes announced on each (from the agent's
    /// status file, not the maps).
    Bgp,
}

/// `address:port` as `SocketAddr` prints it (IPv6 in brackets).
fn endpoint(addr: IpAddr, port: u16) -> String {
    SocketAddr::new(addr, port).to_string()
}

fn flags_text(pairs: &[(bool, &str)]) -> String {
    let v: Vec<&str> = pairs
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

/// Rows as JSON objects; printed as a table or as a JSON array.
pub fn rows(
    maps: &Maps,
    what: What,
    names: &std::collections::BTreeMap<u32, FrontendInfo>,
) -> Result<Vec<Value>> {
    let name_of = |id: u32| {
        names
            .get(&id)
            .map(|i| i.service.clone())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    match what {
        What::Services => {
            for entry in maps.services.iter() {
                let (key, s) = entry?;
                let frontend = frontend_from_key(&key)
                    .map(|f| f.to_string())
                    .unwrap_or_default();
                out.push(json!({
                    "service_id": s.service_id,
                    "frontend": frontend,
                    "service": name_of(s.service_id),
                    "backends": s.backend_count,
                    "flags": flags_text(&[
                        (s.flags & SERVICE_F_LOCAL_ONLY != 0, "local"),
                        (s.flags & SERVICE_F_SOURCE_RANGES != 0, "source-ranges"),
                        (s.flags & SERVICE_F_AFFINITY != 0, "affinity"),
                    ]),
                    "affinity_timeout": s.affinity_timeout,
                }));
            }
            out.sort_by_key(|v| v["service_id"].as_u64());
        }
        What::Backends => {
            for entry in maps.backends.iter() {
                let (id, b) = entry?;
                out.push(json!({
                    "backend_id": id,
                    "service_id": b.service_id,
                    "service": name_of(b.service_id),
                    "address": endpoint(addr_from16(&b.addr, b.family), b.port.host()),
                    "flags": flags_text(&[
                        (b.flags & BACKEND_F_LOCAL != 0, "local"),
                        (b.flags & BACKEND_F_TERMINATING != 0, "terminating"),
                    ]),
                }));
            }
            out.sort_by_key(|v| v["backend_id"].as_u64());
        }
        What::Flows => {
            let now = netdev::monotonic_ns();
            for entry in maps.flows.iter() {
                let (key, flow): (FlowKey, Flow) = entry?;
                let proto = Protocol::from_number(key.proto)
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| key.proto.to_string());
                // A flow entry carries no family of its own: the rewritten
                // tuple has its key's.
                let addr = |a: &[u8; 16]| addr_from16(a, key.family);
                out.push(json!({
                    "protocol": proto,
                    "from": endpoint(addr(&key.src_addr), key.src_port.host()),
                    "to": endpoint(addr(&key.dst_addr), key.dst_port.host()),
                    "rewritten_from": endpoint(addr(&flow.src_addr), flow.src_port.host()),
                    "rewritten_to": endpoint(addr(&flow.dst_addr), flow.dst_port.host()),
                    "service_id": flow.service_id,
                    "backend_id": flow.backend_id,
                    "direction": if flow.flags & FLOW_F_REPLY != 0 { "reply" } else { "forward" },
                    "flags": flags_text(&[
                        (flow.flags & FLOW_F_SNAT != 0, "snat"),
                        (flow.flags & FLOW_F_CLOSING != 0, "closing"),
                        (flow.flags & FLOW_F_ANSWERED != 0, "answered"),
                    ]),
                    "idle_s": now.saturating_sub(flow.last_seen_ns) / 1_000_000_000,
                }));
            }
        }
        What::L2 => {
            let now = netdev::monotonic_ns();
            let live = maps.l2_liveness.get(&lb_common::L2_LIVENESS_KEY, 0)?;
            let answering = live.refreshed_ns != 0
                && now.saturating_sub(live.refreshed_ns) <= live.stale_after_ns;
            for (key, answer) in maps.l2_entries()? {
                let stats = maps.l2_stats(key.ifindex)?;
                let interface = nix::net::if_::if_indextoname(key.ifindex)
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| key.ifindex.to_string());
                let mac = answer
                    .mac
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":");
                out.push(json!({
                    "address": crate::announce::l2::key_addr(&key).to_string(),
                    "interface": interface,
                    "mac": mac,
                    "answering": answering,
                    "refreshed_ms_ago": (live.refreshed_ns != 0)
                        .then(|| now.saturating_sub(live.refreshed_ns) / 1_000_000),
                    "interface_requests": stats.requests,
                    "interface_replies": stats.replies,
                    "interface_stale": stats.stale,
                }));
            }
            out.sort_by(|a, b| a["address"].as_str().cmp(&b["address"].as_str()));
        }
        // The caller reads it from `announce::bgp::status`.
        What::Bgp => {}
        What::Stats => {
            let mut ids: Vec<u32> = Vec::new();
            for entry in maps.services.iter() {
                ids.push(entry?.1.service_id);
            }
            ids.sort();
            for id in ids {
                let s = maps.service_stats(id)?;
                out.push(json!({
                    "service_id": id,
                    "service": name_of(id),
                    "packets": s.packets,
                    "bytes": s.bytes,
                    "reply_packets": s.reply_packets,
                    "reply_bytes": s.reply_bytes,
                    "new_flows": s.new_flows,
                    "drop_source_range": s.drop_source_range,
                    "drop_no_backend": s.drop_no_backend,
                    "drop_snat_exhausted": s.drop_snat_exhausted,
                    "drop_unsupported": s.drop_unsupported,
                    "drop_flow_conflict": s.drop_flow_conflict,
                }));
            }
            let g = maps.global_stats()?;
            out.push(json!({
                "service_id": "node",
                "service": "(not a service)",
                "passed": g.passed,
                "redirected": g.redirected,
                "translated_passed": g.translated_passed,
                "malformed": g.malformed,
                "icmp_translated": g.icmp_translated,
                "frag_needed_sent": g.frag_needed_sent,
                "reply_wrong_interface": g.reply_wrong_interface,
                "flow_halves_restored": g.flow_halves_restored,
                "host_socket": g.host_socket,
                "stale_passed": g.stale_passed,
                "fragments_translated": g.fragments_translated,
                "reply_leaks_dropped": g.reply_leaks_dropped,
                "time_exceeded_sent": g.time_exceeded_sent,
            }));
        }
    }
    Ok(out)
}

/// Renders rows as aligned tables: consecutive rows with the same columns
/// share one table (the node-wide counters of `stats` get their own).
pub fn table(rows: &[Value]) -> String {
    let mut out = String::new();
    let mut start = 0;
    let keys = |v: &Value| -> Vec<String> {
        v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    for i in 1..=rows.len() {
        if i == rows.len() || keys(&rows[i]) != keys(&rows[start]) {
            if start > 0 {
                out.push('\n');
            }
            out.push_str(&one_table(&rows[start..i]));
            start = i;
        }
    }
    if rows.is_empty() {
        out.push_str("(empty)\n");
    }
    out
}

fn one_table(rows: &[Value]) -> String {
    let Some(first) = rows.iter().find_map(|r| r.as_object()) else {
        return "(empty)\n".into();
    };
    let mut columns: Vec<String> = first.keys().cloned().collect();
    for r in rows {
        if let Some(o) = r.as_object() {
            for k in o.keys() {
                if !columns.contains(k) {
                    columns.push(k.clone());
                }
            }
        }
    }
    let cell = |v: Option<&Value>| match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    let mut widths: Vec<usize> = columns.iter().map(|c| c.len()).collect();
    for r in rows {
        for (i, c) in columns.iter().enumerate() {
            widths[i] = widths[i].max(cell(r.get(c)).len());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            s.push_str(&format!("{:<w$}  ", c, w = widths[i]));
        }
        s.trim_end().to_string() + "\n"
    };
    out.push_str(&line(columns.iter().map(|c| c.to_uppercase()).collect()));
    for r in rows {
        out.push_str(&line(columns.iter().map(|c| cell(r.get(c))).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use lb_common::{FAMILY_V4, FAMILY_V6};

    use super::*;

    #[test]
    fn addresses_of_both_families_print_in_their_usual_notation() {
        let v6: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(
            endpoint(addr_from16(&v6.octets(), FAMILY_V6), 80),
            "[2001:db8::1]:80"
        );
        assert_eq!(
            endpoint(
                addr_from16(&lb_common::addr_v4([192, 0, 2, 1]), FAMILY_V4),
                80
            ),
            "192.0.2.1:80"
        );
    }
}
