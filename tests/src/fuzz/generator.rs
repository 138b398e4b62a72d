//! Random and mutated frames: Ethernet with or without one VLAN tag, IPv4
//! with or without options, fragments, every header cut short, odd IHL,
//! version and total length, TCP with any flags, UDP (with and without a
//! checksum), ICMP echo and ICMP errors quoting real flows (either
//! direction) or random tuples, bad checksums. Tuples are aimed at
//! frontends, at known flows' forward and reply keys, or anywhere.

use fastrand::Rng;

use super::{
    Program,
    checksum::Delta,
    headers::{
        ETH_P_8021AD, ETH_P_8021Q, IP_CHECK, IP_FRAG, IP_TOT_LEN, IP_TTL, PROTO_ICMP, Tuple,
    },
};
use crate::packet::{checksum, pseudo_checksum};

/// What a frame was built to hit (the report counts by outcome, this only
/// explains a failure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aim {
    Frontend,
    ForwardKey,
    ReplyKey,
    RandomTuple,
    IcmpEcho,
    /// An ICMP error about a translated packet of a known flow.
    IcmpErrorOfFlow,
    IcmpErrorRandom,
    NotIpv4,
}

/// One frame for one program.
#[derive(Clone, Debug)]
pub struct Case {
    pub program: Program,
    /// Index into the fixture's interfaces the XDP frame "arrives" on.
    pub ingress: usize,
    pub frame: Vec<u8>,
    pub aim: Aim,
}

/// One flow the datapath made: the client's tuple and what it was
/// translated to (its reply key is that reversed).
#[derive(Clone, Copy, Debug)]
pub struct KnownFlow {
    pub original: Tuple,
    pub translated: Tuple,
}

/// What frames are aimed at.
pub struct Targets {
    /// (address, port, protocol) of every frontend.
    pub frontends: Vec<([u8; 4], u16, u8)>,
    /// Client, backend, router and other addresses worth hitting.
    pub addresses: Vec<[u8; 4]>,
}

pub struct Generator {
    rng: Rng,
    targets: Targets,
    icmp_errors: bool,
    interfaces: usize,
}

const TCP_FLAG_CHOICES: [u8; 12] = [
    0x02, 0x02, 0x02, 0x12, 0x10, 0x10, 0x04, 0x14, 0x11, 0x01, 0x03, 0x06,
];

impl Generator {
    pub fn new(seed: u64, targets: Targets, icmp_errors: bool, interfaces: usize) -> Generator {
        Generator {
            rng: Rng::with_seed(seed),
            targets,
            icmp_errors,
            interfaces,
        }
    }

    pub fn next(&mut self, flows: &[KnownFlow]) -> Case {
        let program = match self.rng.u8(0..4) {
            0 | 1 => Program::Xdp,
            2 => Program::TcIngress,
            _ => Program::TcEgress,
        };
        let ingress = self.rng.usize(0..self.interfaces);
        let roll = self.rng.u8(0..100);
        let (aim, frame) = match roll {
            0..20 => (Aim::Frontend, self.for_a_frontend()),
            20..40 if !flows.is_empty() => {
                let flow = flows[self.rng.usize(0..flows.len())];
                let frame = self.transport_frame(flow.original, Some(flow.translated));
                (Aim::ForwardKey, frame)
            }
            40..60 if !flows.is_empty() => {
                let flow = flows[self.rng.usize(0..flows.len())];
                let frame = self
                    .transport_frame(flow.translated.reversed(), Some(flow.original.reversed()));
                (Aim::ReplyKey, frame)
            }
            60..78 if self.icmp_errors && !flows.is_empty() => {
                let flow = flows[self.rng.usize(0..flows.len())];
                (Aim::IcmpErrorOfFlow, self.icmp_error_of(flow))
            }
            78..84 if self.icmp_errors => {
                let quoted = self.random_tuple();
                let to = if self.rng.bool() {
                    quoted.src
                } else {
                    self.address()
                };
                (Aim::IcmpErrorRandom, self.icmp_error(quoted, to))
            }
            84..89 => (Aim::IcmpEcho, self.icmp_echo()),
            89..93 => (Aim::NotIpv4, self.not_ipv4()),
            _ => {
                let tuple = self.random_tuple();
                (Aim::RandomTuple, self.transport_frame(tuple, None))
            }
        };
        Case {
            program,
            ingress,
            frame,
            aim,
        }
    }

    fn address(&mut self) -> [u8; 4] {
        if self.rng.u8(0..10) == 0 {
            self.rng.u32(..).to_be_bytes()
        } else {
            self.targets.addresses[self.rng.usize(0..self.targets.addresses.len())]
        }
    }

    fn port(&mut self) -> u16 {
        match self.rng.u8(0..4) {
            0 => self.rng.u16(..),
            1 => [80, 90, 443, 8080, 8443][self.rng.usize(0..5)],
            _ => self.rng.u16(40000..40016),
        }
    }

    fn random_tuple(&mut self) -> Tuple {
        Tuple {
            src: self.address(),
            dst: self.address(),
            sport: self.port(),
            dport: self.port(),
            proto: if self.rng.bool() { 6 } else { 17 },
        }
    }

    fn for_a_frontend(&mut self) -> Vec<u8> {
        let (addr, port, proto) =
            self.targets.frontends[self.rng.usize(0..self.targets.frontends.len())];
        let tuple = Tuple {
            src: self.address(),
            dst: addr,
            sport: self.port(),
            dport: port,
            proto,
        };
        self.transport_frame(tuple, None)
    }

    fn payload(&mut self) -> Vec<u8> {
        // Now and then more than the 1400-byte link takes.
        let len = if self.rng.u8(0..30) == 0 {
            self.rng.usize(1340..1480)
        } else {
            self.rng.usize(0..48)
        };
        (0..len).map(|_| self.rng.u8(..)).collect()
    }

    /// A TCP or UDP packet of `tuple`, valid, then perhaps mutated. When it
    /// will be rewritten to `rewrite`, its L4 checksum is now and then set so
    /// that the rewrite's incremental update lands on zero (UDP must send
    /// that as 0xffff; TCP keeps it).
    fn transport_frame(&mut self, tuple: Tuple, rewrite: Option<Tuple>) -> Vec<u8> {
        let payload = self.payload();
        let mut l4 = Vec::new();
        l4.extend_from_slice(&tuple.sport.to_be_bytes());
        l4.extend_from_slice(&tuple.dport.to_be_bytes());
        let check_at = if tuple.proto == 6 {
            let flags = if self.rng.u8(0..8) == 0 {
                self.rng.u8(..)
            } else {
                TCP_FLAG_CHOICES[self.rng.usize(0..TCP_FLAG_CHOICES.len())]
            };
            l4.extend_from_slice(&self.rng.u32(..).to_be_bytes());
            l4.extend_from_slice(&self.rng.u32(..).to_be_bytes());
            l4.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
            16
        } else {
            l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
            6
        };
        l4.extend_from_slice(&payload);
        let c = pseudo_checksum(&tuple.src.into(), &tuple.dst.into(), tuple.proto, &l4);
        let c = if tuple.proto == 17 && c == 0 {
            0xffff
        } else {
            c
        };
        l4[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
        if tuple.proto == 17 && self.rng.u8(0..8) == 0 {
            l4[6..8].copy_from_slice(&[0, 0]); // no checksum
        }
        if self.rng.u8(0..10) == 0 {
            l4[check_at] ^= self.rng.u8(1..);
        }
        if let Some(to) = rewrite
            && self.rng.u8(0..10) == 0
        {
            let word = |b: [u8; 4]| u32::from_ne_bytes(b);
            let port = |p: u16| u16::from_ne_bytes(p.to_be_bytes());
            let mut delta = Delta::default();
            delta.dword(word(tuple.src), word(to.src));
            delta.dword(word(tuple.dst), word(to.dst));
            delta.word(port(tuple.sport), port(to.sport));
            delta.word(port(tuple.dport), port(to.dport));
            l4[check_at..check_at + 2].copy_from_slice(&delta.folded().to_ne_bytes());
        }
        let options = if self.rng.u8(0..12) == 0 {
            self.rng.usize(1..11) * 4
        } else {
            0
        };
        let frame = self.ipv4_frame(tuple.src, tuple.dst, tuple.proto, options, &l4);
        self.mutate(frame, 20 + options)
    }

    fn icmp_echo(&mut self) -> Vec<u8> {
        let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
        icmp.extend(self.payload());
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let (src, dst) = (self.address(), self.address());
        let frame = self.ipv4_frame(src, dst, PROTO_ICMP, 0, &icmp);
        self.mutate(frame, 20)
    }

    /// An ICMP error about one of `flow`'s packets as it left the node:
    /// toward the backend (translated; the error goes to the translated
    /// source) or toward the client (the reply, from the frontend; the error
    /// goes to the frontend).
    fn icmp_error_of(&mut self, flow: KnownFlow) -> Vec<u8> {
        let quoted = if self.rng.bool() {
            flow.translated
        } else {
            flow.original.reversed()
        };
        // Addressed to whoever sent the quoted packet, but not always.
        let to = if self.rng.u8(0..10) == 0 {
            self.address()
        } else {
            quoted.src
        };
        self.icmp_error(quoted, to)
    }

    fn icmp_error(&mut self, quoted: Tuple, to: [u8; 4]) -> Vec<u8> {
        let (kind, code) = match self.rng.u8(0..20) {
            0 => ([0, 4, 5, 8, 12][self.rng.usize(0..5)], 0),
            1..4 => (11, self.rng.u8(0..2)),
            _ => (3, self.rng.u8(0..16)),
        };
        let mut icmp = vec![kind, code, 0, 0, 0, 0, 0, 0];
        if kind == 3 && code == 4 {
            icmp[6..8].copy_from_slice(&1400u16.to_be_bytes());
        }
        // The quoted header as the packet left, with its own length.
        let mut inner = vec![0x45, 0];
        inner.extend_from_slice(&self.rng.u16(40..1500).to_be_bytes());
        inner.extend_from_slice(&self.rng.u16(..).to_be_bytes());
        inner.extend_from_slice(&[0x40, 0, self.rng.u8(1..65), quoted.proto, 0, 0]);
        inner.extend_from_slice(&quoted.src);
        inner.extend_from_slice(&quoted.dst);
        let c = checksum(&inner);
        inner[10..12].copy_from_slice(&c.to_be_bytes());
        if self.rng.u8(0..10) == 0 {
            inner[11] ^= self.rng.u8(1..);
        }
        match self.rng.u8(0..30) {
            0 => inner[0] = 0x40 | self.rng.u8(0..16), // IHL
            1 => inner[9] = self.rng.u8(..),           // protocol
            2 => inner[0] = (self.rng.u8(0..16) << 4) | 5,
            3 => inner[6] = self.rng.u8(..), // fragment bits
            _ => {}
        }
        icmp.extend_from_slice(&inner);
        let mut l4 = Vec::new();
        l4.extend_from_slice(&quoted.sport.to_be_bytes());
        l4.extend_from_slice(&quoted.dport.to_be_bytes());
        if quoted.proto == 6 {
            l4.extend_from_slice(&self.rng.u32(..).to_be_bytes());
            // Often only the 8 bytes every router quotes; else the whole
            // header, checksum included, and some payload.
            if self.rng.bool() {
                l4.extend_from_slice(&self.rng.u32(..).to_be_bytes());
                l4.extend_from_slice(&[0x50, 0x12, 0xff, 0xff]);
                l4.extend_from_slice(&self.rng.u16(..).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
                l4.extend((0..self.rng.usize(0..16)).map(|_| self.rng.u8(..)));
            }
        } else {
            l4.extend_from_slice(&self.rng.u16(8..1480).to_be_bytes());
            let check = if self.rng.u8(0..5) == 0 {
                0
            } else {
                self.rng.u16(..)
            };
            l4.extend_from_slice(&check.to_be_bytes());
            l4.extend((0..self.rng.usize(0..16)).map(|_| self.rng.u8(..)));
        }
        icmp.extend_from_slice(&l4);
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        if self.rng.u8(0..10) == 0 {
            icmp[3] ^= self.rng.u8(1..);
        }
        let from = self.address();
        let frame = self.ipv4_frame(from, to, PROTO_ICMP, 0, &icmp);
        // Cut inside the quoted headers now and then.
        let l3 = self.l3_of(&frame);
        let mut frame = self.mutate(frame, 20);
        if self.rng.u8(0..15) == 0 {
            let cut = l3 + 28 + self.rng.usize(0..28);
            frame.truncate(cut.max(14));
        }
        frame
    }

    fn not_ipv4(&mut self) -> Vec<u8> {
        let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
        let ether_type: u16 = [0x0806, 0x86dd, 0x88cc, self.rng.u16(..)][self.rng.usize(0..4)];
        frame.extend_from_slice(&ether_type.to_be_bytes());
        frame.extend((0..self.rng.usize(0..80)).map(|_| self.rng.u8(..)));
        frame
    }

    fn l3_of(&self, frame: &[u8]) -> usize {
        if frame[12..14] == 0x0800u16.to_be_bytes() {
            14
        } else {
            18
        }
    }

    /// Ethernet (perhaps one tag) + IPv4 (DF, perhaps `options` bytes of
    /// options) + `l4`, header checksum valid.
    fn ipv4_frame(
        &mut self,
        src: [u8; 4],
        dst: [u8; 4],
        proto: u8,
        options: usize,
        l4: &[u8],
    ) -> Vec<u8> {
        let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
        match self.rng.u8(0..6) {
            0 => frame.extend_from_slice(&ETH_P_8021Q.to_be_bytes()),
            1 => frame.extend_from_slice(&ETH_P_8021AD.to_be_bytes()),
            _ => {}
        }
        if frame.len() == 14 {
            frame.extend_from_slice(&(self.rng.u16(..) & 0x0fff).to_be_bytes());
        }
        frame.extend_from_slice(&[0x08, 0x00]);
        let ihl = 5 + options / 4;
        let mut ip = vec![(0x40 | ihl) as u8, self.rng.u8(..) & 0xfc];
        ip.extend_from_slice(&((ihl * 4 + l4.len()) as u16).to_be_bytes());
        // The IP id: often one of a few, so that a later fragment meets the
        // record its first fragment left.
        let id = if self.rng.bool() {
            self.rng.u16(0..4)
        } else {
            self.rng.u16(..)
        };
        ip.extend_from_slice(&id.to_be_bytes());
        ip.extend_from_slice(&[0x40, 0, self.rng.u8(2..65), proto, 0, 0]);
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        // NOPs, or random option bytes (the datapath must not read them).
        let random_options = self.rng.bool();
        ip.extend((0..options).map(|_| if random_options { self.rng.u8(..) } else { 1 }));
        let c = checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(l4);
        frame
    }

    /// Perhaps breaks the IPv4 header (`ip_len` bytes) or cuts the frame at
    /// or near a header boundary.
    fn mutate(&mut self, mut frame: Vec<u8>, ip_len: usize) -> Vec<u8> {
        let l3 = self.l3_of(&frame);
        let mut header_changed = false;
        if self.rng.u8(0..25) == 0 {
            frame[l3] = (self.rng.u8(0..16) << 4) | (frame[l3] & 0x0f); // version
            header_changed = true;
        }
        if self.rng.u8(0..25) == 0 {
            frame[l3] = (frame[l3] & 0xf0) | self.rng.u8(0..16); // IHL
            header_changed = true;
        }
        if self.rng.u8(0..12) == 0 {
            let len = match self.rng.u8(0..3) {
                0 => self.rng.u16(..),
                1 => self.rng.u16(0..60),
                _ => self.rng.u16(1401..1600),
            };
            frame[l3 + IP_TOT_LEN..l3 + IP_TOT_LEN + 2].copy_from_slice(&len.to_be_bytes());
            header_changed = true;
        }
        if self.rng.u8(0..12) == 0 {
            let frag: u16 = match self.rng.u8(0..5) {
                0 => 0x2000,                               // MF, first fragment
                1 => 0x2000 | self.rng.u16(1..0x2000),     // MF, later
                2 => self.rng.u16(1..0x2000),              // last fragment
                3 => 0,                                    // DF off
                _ => 0x4000 | (self.rng.u16(0..2) * 0x10), // DF (+ an offset)
            };
            frame[l3 + IP_FRAG..l3 + IP_FRAG + 2].copy_from_slice(&frag.to_be_bytes());
            header_changed = true;
        }
        if self.rng.u8(0..20) == 0 {
            frame[l3 + IP_TTL] = self.rng.u8(0..2);
            header_changed = true;
        }
        if header_changed && self.rng.bool() {
            // Keep the header checksum right, so only the odd field is odd.
            let ihl = ((frame[l3] & 0x0f) as usize * 4).clamp(20, ip_len);
            frame[l3 + IP_CHECK..l3 + IP_CHECK + 2].copy_from_slice(&[0, 0]);
            let c = checksum(&frame[l3..l3 + ihl]);
            frame[l3 + IP_CHECK..l3 + IP_CHECK + 2].copy_from_slice(&c.to_be_bytes());
        }
        if self.rng.u8(0..15) == 0 {
            frame[l3 + IP_CHECK + 1] ^= self.rng.u8(1..);
        }
        if self.rng.u8(0..25) == 0 {
            let at = self.rng.usize(0..frame.len());
            frame[at] ^= self.rng.u8(1..);
        }
        if self.rng.u8(0..10) == 0 {
            let l4 = l3 + ip_len;
            let boundaries = [
                14,
                16,
                l3,
                l3 + 10,
                l3 + 19,
                l3 + 20,
                l4,
                l4 + 2,
                l4 + 4,
                l4 + 7,
                l4 + 8,
                l4 + 14,
                l4 + 17,
                l4 + 18,
                l4 + 20,
            ];
            let cut = boundaries[self.rng.usize(0..boundaries.len())];
            frame.truncate(cut.max(14));
        }
        frame
    }
}
