//! Ending a forwarded connection from the middle: an RST toward each side, sent from userspace
//! out the interface and MACs the connection's conntrack entries cached.
//!
//! Each RST carries the sequence number the receiver expects next (tracked per direction by the
//! program), so the receiver accepts it (RFC 5961 wants an exact match). If the number is stale
//! (segments in flight), the receiver answers with a challenge ACK; that ACK finds no conntrack
//! entry any more and reaches the gateway's kernel, which has no such socket and answers with an
//! RST carrying exactly the right number. Either way the connection ends promptly.

use std::{
    collections::HashMap,
    mem,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use kpf_common::{Direction, Flow, FlowKey, csum, tcp};

use crate::{
    error::{Error, Result},
    loader::{self, Dataplane},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const TCP_RST: u8 = 0x04;

/// An Ethernet/IPv4/TCP RST frame with correct checksums, with the connection's 802.1Q tag if
/// it has one (the program keeps a frame's tag, so the peers are on that VLAN).
pub fn frame(flow: &Flow, seq: u32) -> Vec<u8> {
    let nh = &flow.next_hop;
    let nat = &flow.nat;
    let mut f = Vec::with_capacity(58);
    f.extend_from_slice(&nh.dst_mac);
    f.extend_from_slice(&nh.src_mac);
    if flow.vlan_tci != 0 {
        f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        f.extend_from_slice(&flow.vlan_tci.to_ne_bytes());
    }
    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
    let l3 = f.len();
    f.resize(l3 + 40, 0);
    let (ip, tcp) = f[l3..].split_at_mut(20);
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = kpf_common::IPPROTO_TCP;
    ip[12..16].copy_from_slice(&nat.src_addr.to_ne_bytes());
    ip[16..20].copy_from_slice(&nat.dst_addr.to_ne_bytes());
    let c = csum::ipv4_header(ip);
    ip[10..12].copy_from_slice(&c.to_ne_bytes());
    let (src, dst) = (nat.src_addr.to_ne_bytes(), nat.dst_addr.to_ne_bytes());
    tcp[0..2].copy_from_slice(&nat.src_port.to_ne_bytes());
    tcp[2..4].copy_from_slice(&nat.dst_port.to_ne_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = TCP_RST;
    let c = csum::transport(src, dst, kpf_common::IPPROTO_TCP, tcp, 16);
    tcp[16..18].copy_from_slice(&c.to_ne_bytes());
    f
}

/// Ends every connection of `flows` (a walk of both tables) whose Original entry matches: both
/// its entries go, then an RST goes to each side if it was still open. Returns how many ended.
/// Each entry is read again just before it goes: since the walk, a new connection may have taken
/// the client's 4-tuple or the SNAT port, and its entries are not this one's to end (a
/// connection's two entries share their creation time).
pub fn end_where(
    dp: &mut Dataplane,
    flows: &HashMap<FlowKey, Flow>,
    matches: impl Fn(&Flow) -> bool,
    sender: &Sender,
) -> Result<usize> {
    let mut ended = 0;
    for (key, f) in flows {
        if f.direction != Direction::Original as u8 || !matches(f) {
            continue;
        }
        if !dp.remove_flow_if(key, |now| now.created_ns == f.created_ns && now.nat == f.nat)? {
            continue;
        }
        let reply_key = FlowKey::reply_of(&f.nat);
        dp.remove_flow_if(&reply_key, |now| now.created_ns == f.created_ns && FlowKey::reply_of(&now.nat) == *key)?;
        ended += 1;
        let open = tcp::State::from_u8(f.state).is_some_and(|s| !s.reusable());
        if let (true, Some(r)) = (open, flows.get(&reply_key)) {
            // Toward the client the backend's next sequence number; toward the backend, the
            // client's.
            for (toward, seq) in [(r, r.next_seq), (f, f.next_seq)] {
                if let Err(e) = sender.reset(toward, seq) {
                    log::warn!("RST for {}: {e}", loader::endpoint(key.src_addr, key.src_port));
                }
            }
        }
    }
    Ok(ended)
}

/// A raw socket for sending frames out of an interface, bypassing routing.
pub struct Sender {
    fd: OwnedFd,
}

impl Sender {
    pub fn new() -> Result<Sender> {
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(Error::io("opening a packet socket")(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh, valid descriptor nobody else owns.
        Ok(Sender { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Sends an RST built from `flow` (the entry whose rewrite leads toward the side to reset)
    /// with sequence number `seq`.
    pub fn reset(&self, flow: &Flow, seq: u32) -> Result<()> {
        let f = frame(flow, seq);
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_IP.to_be();
        sll.sll_ifindex = flow.next_hop.ifindex as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&flow.next_hop.dst_mac);
        // SAFETY: valid buffer and address of the stated sizes.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                f.as_ptr().cast(),
                f.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(Error::io("sending an RST")(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use kpf_common::{FlowKey, NextHop, nat::Nat, wire};

    use super::*;

    #[test]
    fn rst_frame_carries_the_connections_vlan_tag() {
        let key = FlowKey::tcp(wire::addr([10, 0, 0, 10].into()), wire::port(50000), wire::addr([10, 0, 0, 1].into()), wire::port(9093));
        let flow = Flow {
            nat: Nat::new(&key, wire::addr([10, 0, 0, 1].into()), wire::port(41000), wire::addr([10, 0, 0, 20].into()), wire::port(39092)),
            // VID 100, priority 5, as the tagged SYN carried it (wire order).
            vlan_tci: u16::from_ne_bytes(((5 << 13) | 100u16).to_be_bytes()),
            ..Flow::default()
        };
        let f = frame(&flow, 7);
        assert_eq!(f.len(), 58);
        assert_eq!((&f[12..14], &f[14..16], &f[16..18]), (&[0x81, 0x00][..], &[0xa0, 0x64][..], &[0x08, 0x00][..]));
        assert_eq!(csum::fold(csum::sum(&f[18..38], 0)), 0xffff, "IP header sums to -0");
        let pseudo = csum::pseudo_header([10, 0, 0, 1], [10, 0, 0, 20], 6, 20) as u32;
        assert_eq!(csum::fold(csum::sum(&f[38..58], pseudo)), 0xffff, "TCP segment sums to -0");
        assert_eq!(f[51], TCP_RST);
    }

    #[test]
    fn rst_frame_has_valid_checksums_and_fields() {
        let key = FlowKey::tcp(wire::addr([10, 64, 0, 2].into()), wire::port(39092), wire::addr([10, 64, 0, 1].into()), wire::port(41000));
        let flow = Flow {
            nat: Nat::new(&key, wire::addr([10, 0, 0, 1].into()), wire::port(9093), wire::addr([10, 0, 0, 10].into()), wire::port(50000)),
            next_hop: NextHop { ifindex: 3, src_mac: [2, 0, 0, 0, 0, 1], dst_mac: [2, 0, 0, 0, 0, 2], fib_gen: 0 },
            ..Flow::default()
        };
        let f = frame(&flow, 0xdead_beef);
        assert_eq!(f.len(), 54, "untagged");
        assert_eq!(&f[0..6], &[2, 0, 0, 0, 0, 2]);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(csum::fold(csum::sum(&f[14..34], 0)), 0xffff, "IP header sums to -0");
        let pseudo = csum::pseudo_header([10, 0, 0, 1], [10, 0, 0, 10], 6, 20) as u32;
        assert_eq!(csum::fold(csum::sum(&f[34..54], pseudo)), 0xffff, "TCP segment sums to -0");
        assert_eq!(u16::from_be_bytes([f[34], f[35]]), 9093);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 50000);
        assert_eq!(u32::from_be_bytes([f[38], f[39], f[40], f[41]]), 0xdead_beef);
        assert_eq!(f[47], TCP_RST);
    }
}
