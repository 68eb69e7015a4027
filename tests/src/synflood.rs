//! A bounded raw SYN generator: Ethernet frames written to an `AF_PACKET` socket of one
//! namespace's interface, each a TCP SYN from a spoofed source address and port.
//!
//! Bounded in count and rate, seeded (the same seed sends the same packets), and confined to the
//! test network: every source and destination address must be inside [`TEST_NET`], which
//! [`SynFlood::run`] checks before sending anything. Checksums are complete (computed here), so
//! the receivers, which verify every checksum, accept the packets.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::{
    netns::Netns,
    peer::{csum_add, csum_fold},
};

/// The only network spoofed (or real) addresses may come from: 10.100.0.0/16.
pub const TEST_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 100, 0, 0), 16);

const ETH_P_IP: u16 = 0x0800;

/// What to send.
#[derive(Clone, Debug)]
pub struct SynFlood {
    /// The sending interface, in the namespace passed to [`SynFlood::run`].
    pub dev: String,
    /// Ethernet source: the sender's own MAC, so replies (and the bridge's learning) stay sane.
    pub src_mac: [u8; 6],
    /// Ethernet destination: the gateway's MAC.
    pub dst_mac: [u8; 6],
    /// Where every SYN goes.
    pub dst: SocketAddrV4,
    /// Sources are drawn from this network (address, prefix length); must lie inside [`TEST_NET`].
    pub src_net: (Ipv4Addr, u8),
    /// How many SYNs to send.
    pub count: u64,
    /// At most this many per second.
    pub rate_pps: u64,
    pub seed: u64,
}

/// What [`SynFlood::run`] did.
#[derive(Clone, Debug)]
pub struct FloodReport {
    /// SYNs the sending interface accepted (its queue took them).
    pub sent: u64,
    pub elapsed: Duration,
    /// Sends the interface refused for a moment (queue full), retried.
    pub retries: u64,
    /// Distinct spoofed source addresses used.
    pub distinct_sources: usize,
}

impl FloodReport {
    pub fn pps(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn mask(bits: u8) -> u32 {
    if bits == 0 { 0 } else { u32::MAX << (32 - bits) }
}

/// Whether network `inner` (address, prefix) lies inside network `outer`.
pub fn net_within(inner: (Ipv4Addr, u8), outer: (Ipv4Addr, u8)) -> bool {
    inner.1 >= outer.1 && u32::from(inner.0) & mask(outer.1) == u32::from(outer.0) & mask(outer.1)
}

/// The MAC address of `dev` in `ns` (from `ip -j link show`).
pub fn mac_of(ns: &Netns, dev: &str) -> io::Result<[u8; 6]> {
    let text = ns.ip(&["-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(io::Error::other)?;
    let s = v[0]["address"].as_str().ok_or_else(|| io::Error::other(format!("no MAC for {dev}: {text}")))?;
    parse_mac(s).ok_or_else(|| io::Error::other(format!("bad MAC {s:?}")))
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// One Ethernet frame: IPv4 (DF, TTL 64) + TCP SYN with an MSS option, every checksum complete.
pub fn syn_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    ip_id: u16,
) -> Vec<u8> {
    let mut tcp = [0u8; 24];
    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 6 << 4; // data offset: 6 words (one option word)
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src.ip().octets());
    pseudo[4..8].copy_from_slice(&dst.ip().octets());
    pseudo[9] = libc::IPPROTO_TCP as u8;
    pseudo[10..12].copy_from_slice(&(tcp.len() as u16).to_be_bytes());
    let c = csum_fold(csum_add(csum_add(0, &pseudo), &tcp));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());

    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&ip_id.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = libc::IPPROTO_TCP as u8;
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let c = csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());

    let mut frame = Vec::with_capacity(14 + ip.len() + tcp.len());
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&tcp);
    frame
}

impl SynFlood {
    /// The `i`-th SYN's source: a host address of `src_net` (never its network or broadcast
    /// address) and a port in 1024..=65535, from `rng`.
    fn source(&self, rng: &mut StdRng) -> SocketAddrV4 {
        let (net, bits) = self.src_net;
        let host_mask = !mask(bits);
        let base = u32::from(net) & mask(bits);
        let host = loop {
            let h = rng.random::<u32>() & host_mask;
            if host_mask < 2 || (h != 0 && h != host_mask) {
                break h;
            }
        };
        SocketAddrV4::new(Ipv4Addr::from(base | host), rng.random_range(1024..=65535))
    }

    /// Sends the flood from `ns` and returns once all `count` SYNs are queued on the interface.
    pub fn run(&self, ns: &Netns) -> io::Result<FloodReport> {
        if !net_within(self.src_net, TEST_NET) || !net_within((*self.dst.ip(), 32), TEST_NET) {
            return Err(io::Error::other(format!(
                "refusing to send: sources {:?} and destination {} must lie inside {:?}",
                self.src_net, self.dst, TEST_NET
            )));
        }
        if self.rate_pps == 0 {
            return Err(io::Error::other("rate_pps must be above 0"));
        }
        let this = self.clone();
        ns.enter(move || this.send_all())?
    }

    fn send_all(&self) -> io::Result<FloodReport> {
        let name = std::ffi::CString::new(self.dev.as_str()).map_err(io::Error::other)?;
        // SAFETY: a valid C string; resolved in this thread's namespace.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // Protocol 0: this socket only sends; it receives nothing.
        // SAFETY: socket has no preconditions; the fd is owned from here on.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_IP.to_be();
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&self.dst_mac);
        let sll_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;

        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut sources = std::collections::HashSet::new();
        let start = Instant::now();
        let mut retries = 0u64;
        let mut stuck_since: Option<Instant> = None;
        let mut sent = 0u64;
        while sent < self.count {
            // Pace: SYN n is due at start + n / rate.
            let due = start + Duration::from_secs_f64(sent as f64 / self.rate_pps as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let src = self.source(&mut rng);
            let frame = syn_frame(self.src_mac, self.dst_mac, src, self.dst, rng.random(), rng.random());
            loop {
                // SAFETY: valid fd, buffer and address.
                let rc = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        frame.as_ptr().cast(),
                        frame.len(),
                        0,
                        (&sll as *const libc::sockaddr_ll).cast(),
                        sll_len,
                    )
                };
                if rc == frame.len() as isize {
                    stuck_since = None;
                    break;
                }
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    // The interface's queue is full for a moment: wait a little and resend.
                    Some(libc::ENOBUFS) | Some(libc::EAGAIN) | Some(libc::EINTR) => {
                        retries += 1;
                        let since = *stuck_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > Duration::from_secs(5) {
                            return Err(io::Error::other(format!(
                                "the interface refused SYNs for 5 s after {sent}: {e}"
                            )));
                        }
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    _ => return Err(io::Error::new(e.kind(), format!("sending SYN {sent}: {e}"))),
                }
            }
            sources.insert(*src.ip());
            sent += 1;
        }
        Ok(FloodReport { sent, elapsed: start.elapsed(), retries, distinct_sources: sources.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_valid_checksums() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 100, 200, 7), 40001);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 100, 0, 1), 9093);
        let f = syn_frame([2; 6], [4; 6], src, dst, 0xdead_beef, 77);
        assert_eq!(f.len(), 14 + 20 + 24);
        let (ip, tcp) = (&f[14..34], &f[34..]);
        assert_eq!(csum_fold(csum_add(0, ip)), 0, "IPv4 header checksum");
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&ip[12..20]);
        pseudo.extend_from_slice(&[0, 6, 0, tcp.len() as u8]);
        assert_eq!(csum_fold(csum_add(csum_add(0, &pseudo), tcp)), 0, "TCP checksum");
        assert_eq!(tcp[13], 0x02);
    }

    #[test]
    fn sources_stay_in_their_network() {
        let flood = SynFlood {
            dev: "eth0".into(),
            src_mac: [0; 6],
            dst_mac: [0; 6],
            dst: "10.100.0.1:9093".parse().unwrap(),
            src_net: (Ipv4Addr::new(10, 100, 128, 0), 17),
            count: 0,
            rate_pps: 1,
            seed: 1,
        };
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..10_000 {
            let s = flood.source(&mut rng);
            assert!(net_within((*s.ip(), 32), flood.src_net), "{s}");
            assert!(s.port() >= 1024);
            let host = u32::from(*s.ip()) & !mask(17);
            assert!(host != 0 && host != !mask(17), "{s} is a network or broadcast address");
        }
        assert!(net_within((Ipv4Addr::new(10, 100, 128, 0), 17), TEST_NET));
        assert!(!net_within((Ipv4Addr::new(10, 101, 0, 0), 17), TEST_NET));
        assert!(!net_within((Ipv4Addr::new(10, 0, 0, 0), 8), TEST_NET));
        assert_eq!(parse_mac("02:aB:00:01:ff:10"), Some([2, 0xab, 0, 1, 0xff, 0x10]));
    }
}
