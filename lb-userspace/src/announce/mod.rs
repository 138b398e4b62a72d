//! Telling the network where Service addresses are: BGP sessions to the
//! routers (`bgp`).

pub mod bgp;
