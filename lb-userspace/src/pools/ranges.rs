//! A pool's `addresses` entries: CIDRs and inclusive ranges of one family
//! each, as numbers, so that counting, containment and "the next free
//! address" are arithmetic and a /64 is never enumerated.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

use crate::translate::families::Family;

/// `start..=end`, both of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AddressRange {
    family: Family,
    start: u128,
    end: u128,
}

impl AddressRange {
    /// `192.0.2.0/24` (host bits are an error: they hide a typo), or
    /// `192.0.2.10-192.0.2.20` (white space around the dash allowed).
    pub fn parse(text: &str) -> Result<AddressRange, String> {
        let text = text.trim();
        if let Some((first, last)) = text.split_once('-') {
            let parse = |part: &str| {
                part.trim().parse::<IpAddr>().map_err(|_| {
                    format!("{:?} in range {text:?} is not an IP address", part.trim())
                })
            };
            let (first, last) = (parse(first)?, parse(last)?);
            if Family::of(first) != Family::of(last) {
                return Err(format!("range {text:?} mixes IPv4 and IPv6"));
            }
            let (start, end) = (number(first), number(last));
            if start > end {
                return Err(format!("range {text:?} ends before it starts"));
            }
            return Ok(AddressRange {
                family: Family::of(first),
                start,
                end,
            });
        }
        let net: IpNet = text
            .parse()
            .map_err(|_| format!("{text:?} is neither a CIDR nor a range (first-last)"))?;
        if net.trunc() != net {
            return Err(format!(
                "CIDR {text:?} has host bits set (did you mean {}?)",
                net.trunc()
            ));
        }
        Ok(AddressRange {
            family: Family::of(net.network()),
            start: number(net.network()),
            end: number(net.broadcast()),
        })
    }

    pub fn family(&self) -> Family {
        self.family
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        Family::of(address) == self.family && (self.start..=self.end).contains(&number(address))
    }

    pub fn overlaps(&self, other: &AddressRange) -> bool {
        self.family == other.family && self.start <= other.end && other.start <= self.end
    }

    /// Addresses in the range that may be handed out.
    pub fn usable(&self, avoid_buggy: bool) -> u128 {
        let all = self.end - self.start + 1;
        if avoid_buggy && self.family == Family::V4 {
            all - [0, 0xff]
                .into_iter()
                .map(|last| {
                    ending_in(self.end, last)
                        - ending_in(self.start.wrapping_sub(1), last) * u128::from(self.start > 0)
                })
                .sum::<u128>()
        } else {
            all
        }
    }

    /// The first address at or after `from` (a number) that `usable`
    /// accepts, if any, in address order.
    pub fn first_from(&self, from: u128, usable: impl Fn(IpAddr) -> bool) -> Option<IpAddr> {
        let mut n = from.max(self.start);
        while n <= self.end {
            let address = address(self.family, n);
            if usable(address) {
                return Some(address);
            }
            n = n.checked_add(1)?;
        }
        None
    }

    pub fn start(&self) -> u128 {
        self.start
    }
}

impl fmt::Display for AddressRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{}",
            address(self.family, self.start),
            address(self.family, self.end)
        )
    }
}

/// IPv4 addresses ending in .0 or .255, which some clients and routers
/// take for network or broadcast addresses (MetalLB's `avoidBuggyIPs`).
pub fn is_buggy_address(address: IpAddr) -> bool {
    matches!(address, IpAddr::V4(_)) && is_buggy(number(address))
}

/// How many numbers in `0..=n` end in the byte `last`.
fn ending_in(n: u128, last: u128) -> u128 {
    if n < last { 0 } else { (n - last) / 256 + 1 }
}

fn is_buggy(n: u128) -> bool {
    matches!(n & 0xff, 0 | 0xff)
}

fn number(address: IpAddr) -> u128 {
    match address {
        IpAddr::V4(v4) => u32::from(v4).into(),
        IpAddr::V6(v6) => v6.into(),
    }
}

fn address(family: Family, n: u128) -> IpAddr {
    match family {
        // Within an IPv4 range every number fits 32 bits.
        Family::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_and_ranges_of_both_families_parse_and_bad_ones_say_why() {
        let cidr = AddressRange::parse("192.0.2.0/30").unwrap();
        assert_eq!(cidr.to_string(), "192.0.2.0-192.0.2.3");
        assert_eq!(cidr.usable(false), 4);
        assert_eq!(cidr.usable(true), 3);
        let range = AddressRange::parse(" 2001:db8::10 - 2001:db8::1f ").unwrap();
        assert_eq!(range.family(), Family::V6);
        assert_eq!(range.usable(true), 16);
        assert!(range.contains("2001:db8::1f".parse().unwrap()));
        assert!(!range.contains("2001:db8::20".parse().unwrap()));
        assert!(!range.contains("192.0.2.1".parse().unwrap()));
        let big = AddressRange::parse("2001:db8::/64").unwrap();
        assert_eq!(big.usable(false), 1 << 64);
        for (bad, why) in [
            ("192.0.2.1/24", "host bits"),
            ("192.0.2.9-192.0.2.1", "ends before"),
            ("192.0.2.1-2001:db8::1", "mixes"),
            ("192.0.2.300", "neither"),
            ("x-192.0.2.1", "not an IP"),
        ] {
            let error = AddressRange::parse(bad).unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
        }
        assert!(cidr.overlaps(&AddressRange::parse("192.0.2.3-192.0.2.9").unwrap()));
        assert!(!cidr.overlaps(&AddressRange::parse("192.0.2.4/30").unwrap()));
    }

    #[test]
    fn first_from_skips_what_is_not_usable() {
        let range = AddressRange::parse("192.0.2.254-192.0.3.1").unwrap();
        let first = range.first_from(0, |a| !is_buggy_address(a));
        assert_eq!(first, Some("192.0.2.254".parse().unwrap()));
        let after = range.first_from(0, |a| {
            !is_buggy_address(a) && a != "192.0.2.254".parse::<IpAddr>().unwrap()
        });
        assert_eq!(after, Some("192.0.3.1".parse().unwrap()));
    }
}
