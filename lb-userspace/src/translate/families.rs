//! Which IP families a Service has, from `spec.ipFamilies` and
//! `spec.ipFamilyPolicy`, as the API server settles them. A Service is
//! served per family: an address of a family it does not have is no
//! frontend of it, and each frontend's backends come from the
//! EndpointSlices of its own family only (the datapath translates an IPv4
//! frontend to IPv4 backends, an IPv6 one to IPv6 backends).

use std::{fmt, net::IpAddr};

use k8s_openapi::api::core::v1::ServiceSpec;

/// An IP family, as `spec.ipFamilies` and EndpointSlice `addressType` name
/// it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// `IPv4` / `IPv6`, the API's spelling; `None` for anything else (an
    /// EndpointSlice's `FQDN`).
    pub fn parse(text: &str) -> Option<Family> {
        match text {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        }
    }

    fn other(self) -> Family {
        match self {
            Family::V4 => Family::V6,
            Family::V6 => Family::V4,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// A Service's families in its order of preference, and what was wrong
/// with the fields they were read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Families {
    /// One or two, without duplicates; the first is the primary family.
    pub list: Vec<Family>,
    /// Messages for the Service's Events (unknown values, contradictions).
    pub problems: Vec<String>,
}

impl Families {
    pub fn contains(&self, family: Family) -> bool {
        self.list.contains(&family)
    }

    /// Where `family` comes in `status.loadBalancer.ingress`: the order of
    /// `spec.ipFamilies`, families the Service does not have last.
    pub fn rank(&self, family: Family) -> usize {
        self.list
            .iter()
            .position(|f| *f == family)
            .unwrap_or(self.list.len())
    }
}

/// The families of a Service with `spec`.
///
/// - `spec.ipFamilies` set: the API server has already resolved the policy
///   against the cluster's families, so the list is used as it is (only its
///   first entry for `SingleStack`, which the API server enforces anyway).
/// - Not set (a hand-written manifest): the primary family is that of
///   `spec.clusterIP`, else IPv4; `PreferDualStack` and `RequireDualStack`
///   add the other family, `SingleStack` (the default) does not.
pub fn service_families(spec: &ServiceSpec) -> Families {
    let mut problems = Vec::new();
    let dual = match spec.ip_family_policy.as_deref() {
        None | Some("SingleStack") => false,
        Some("PreferDualStack" | "RequireDualStack") => true,
        Some(other) => {
            problems.push(format!(
                "unknown ipFamilyPolicy {other:?} (expected SingleStack, PreferDualStack or \
                 RequireDualStack); using SingleStack"
            ));
            false
        }
    };
    let mut listed: Vec<Family> = Vec::new();
    for text in spec.ip_families.iter().flatten() {
        match Family::parse(text) {
            Some(family) if !listed.contains(&family) => listed.push(family),
            Some(_) => problems.push(format!("ipFamilies lists {text} twice")),
            None => problems.push(format!(
                "ipFamilies entry {text:?} is not IPv4 or IPv6; entry skipped"
            )),
        }
    }
    let list = if !listed.is_empty() {
        if !dual && listed.len() > 1 {
            problems.push(format!(
                "ipFamilies lists {} families but ipFamilyPolicy is SingleStack; using {}",
                listed.len(),
                listed[0]
            ));
            listed.truncate(1);
        }
        listed
    } else {
        let primary = spec
            .cluster_ip
            .as_deref()
            .and_then(|text| text.parse::<IpAddr>().ok())
            .map_or(Family::V4, Family::of);
        if dual {
            vec![primary, primary.other()]
        } else {
            vec![primary]
        }
    };
    Families { list, problems }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn families(spec: serde_json::Value) -> Families {
        service_families(&serde_json::from_value(spec).unwrap())
    }

    #[test]
    fn ip_families_as_the_api_server_resolved_them_are_used_in_order() {
        use Family::*;
        for (spec, want) in [
            (json!({"ipFamilies": ["IPv4"]}), vec![V4]),
            (
                json!({"ipFamilies": ["IPv6"], "ipFamilyPolicy": "SingleStack"}),
                vec![V6],
            ),
            (
                json!({"ipFamilies": ["IPv6", "IPv4"], "ipFamilyPolicy": "PreferDualStack"}),
                vec![V6, V4],
            ),
            (
                json!({"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack"}),
                vec![V4, V6],
            ),
            // PreferDualStack in a single-stack cluster: the API server
            // wrote one family, and one it is.
            (
                json!({"ipFamilies": ["IPv4"], "ipFamilyPolicy": "PreferDualStack"}),
                vec![V4],
            ),
        ] {
            let got = families(spec.clone());
            assert_eq!(got.list, want, "{spec}");
            assert!(got.problems.is_empty(), "{spec}: {:?}", got.problems);
        }
    }

    #[test]
    fn without_ip_families_the_cluster_ip_and_the_policy_decide() {
        use Family::*;
        for (spec, want) in [
            (json!({}), vec![V4]),
            (json!({"clusterIP": "None"}), vec![V4]),
            (json!({"clusterIP": "fd00:96::10"}), vec![V6]),
            (json!({"clusterIP": "10.96.0.10"}), vec![V4]),
            (json!({"ipFamilyPolicy": "PreferDualStack"}), vec![V4, V6]),
            (
                json!({"ipFamilyPolicy": "RequireDualStack", "clusterIP": "fd00:96::10"}),
                vec![V6, V4],
            ),
            (
                json!({"ipFamilyPolicy": "SingleStack", "clusterIP": "fd00:96::10"}),
                vec![V6],
            ),
        ] {
            assert_eq!(families(spec.clone()).list, want, "{spec}");
        }
    }

    #[test]
    fn unknown_values_are_reported_and_the_rest_is_used() {
        let got = families(json!({"ipFamilies": ["IPv5", "IPv6"], "ipFamilyPolicy": "Maybe"}));
        assert_eq!(got.list, [Family::V6]);
        assert_eq!(got.problems.len(), 2, "{:?}", got.problems);
        assert!(got.problems[0].contains("\"Maybe\""), "{:?}", got.problems);
        assert!(got.problems[1].contains("\"IPv5\""), "{:?}", got.problems);

        let got = families(json!({"ipFamilies": ["IPv6", "IPv4"]}));
        assert_eq!(got.list, [Family::V6]);
        assert!(
            got.problems[0].contains("SingleStack"),
            "{:?}",
            got.problems
        );

        let got = families(json!({"ipFamilies": ["IPv4", "IPv4"]}));
        assert_eq!(got.list, [Family::V4]);
        assert_eq!(got.problems.len(), 1);
    }

    #[test]
    fn ranks_follow_the_list_and_missing_families_come_last() {
        let got =
            families(json!({"ipFamilies": ["IPv6", "IPv4"], "ipFamilyPolicy": "RequireDualStack"}));
        assert_eq!((got.rank(Family::V6), got.rank(Family::V4)), (0, 1));
        let single = families(json!({"ipFamilies": ["IPv4"]}));
        assert_eq!((single.rank(Family::V4), single.rank(Family::V6)), (0, 1));
        assert!(!single.contains(Family::V6));
    }
}
