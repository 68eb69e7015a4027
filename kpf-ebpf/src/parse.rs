//! Header parsing with bounds checks the verifier can follow. Anything this does not fully
//! understand is reported with the reason and handed to the kernel untouched.

use kpf_common::{Counter, FlowKey, IPPROTO_TCP};

use crate::{
    access::{at, load16, load32},
    frame::Frame,
};

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_HLEN: usize = 8;
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr};

const ETH_P_IP: u16 = 0x0800u16.to_be();
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const VLAN_HLEN: usize = 4;
/// Fragment offset and More Fragments bits (DF alone is fine).
const IP_FRAG_MASK: u16 = 0x3fff;

/// A TCP/IPv4 packet whose headers are all inside the frame.
pub struct Packet {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    pub tcp: *mut TcpHdr,
    pub key: FlowKey,
    pub flags: u8,
    /// IPv4 total length: what the frontend byte counters count.
    pub ip_len: u16,
    /// TCP payload length.
    pub payload: u16,
    /// The frame carries an 802.1Q tag.
    pub vlan: bool,
    /// Its tag control word (wire order), 0 if untagged.
    pub vlan_tci: u16,
}

/// An ICMP error (destination unreachable, time exceeded) quoting a TCP/IPv4 header: how
/// path-MTU discovery reaches the endpoints of a NATed connection.
pub struct IcmpError {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    /// The ICMP header: type, code, checksum, then 4 bytes (the next-hop MTU for "fragmentation
    /// needed").
    pub icmp: *mut [u8; ICMP_HLEN],
    /// The quoted IPv4 header: the packet that could not be delivered.
    pub inner_ip: *mut Ipv4Hdr,
    /// The quoted TCP header's ports and sequence number.
    pub inner_l4: *mut [u8; 8],
    /// The quoted TCP checksum, or null when the quote is too short to hold it. (A raw pointer,
    /// not an Option: LLVM splits an Option of a packet pointer in ways the verifier rejects.)
    pub inner_check: *mut [u8; 2],
    /// The quoted packet's 4-tuple, as it travelled.
    pub inner: FlowKey,
}

pub enum Parsed {
    Tcp(Packet),
    /// An IPv4 ICMP message whose header starts at this offset (parsed further by `icmp`).
    Icmp { l4: usize },
}

impl Packet {
    /// The segment's sequence number (host order).
    #[inline(always)]
    pub fn seq(&self) -> u32 {
        // SAFETY: parse bounds-checked the TCP header.
        u32::from_be(unsafe { load32::<{ at::TCP_SEQ }>(self.tcp as *const u8) })
    }

    /// The segment's acknowledgment number (host order).
    #[inline(always)]
    pub fn ack_seq(&self) -> u32 {
        // SAFETY: parse bounds-checked the TCP header.
        u32::from_be(unsafe { load32::<{ at::TCP_ACK_SEQ }>(self.tcp as *const u8) })
    }

    /// The sequence number the sender will use after this segment.
    #[inline(always)]
    pub fn next_seq(&self) -> u32 {
        kpf_common::seq::next(self.seq(), self.payload as u32, self.flags)
    }
}

#[inline(always)]
fn ptr_at<T, C: Frame>(ctx: &C, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The offset of the outer IPv4 header (after an optional 802.1Q tag).
#[inline(always)]
fn l4_to_l3<C: Frame>(ctx: &C) -> Result<usize, Counter> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Counter::PassMalformed)?;
    // SAFETY: bounds checked.
    Ok(if unsafe { (*eth).ether_type } == ETH_P_8021Q { EthHdr::LEN + VLAN_HLEN } else { EthHdr::LEN })
}

/// The ICMP error at `l4`, if it quotes TCP/IPv4. The outer headers were checked by [`parse`].
#[inline(always)]
pub fn icmp_error<C: Frame>(ctx: &C, l4: usize) -> Result<IcmpError, Counter> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Counter::PassMalformed)?;
    let l3 = l4_to_l3(ctx)?;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, l3).ok_or(Counter::PassMalformed)?;
    let icmp: *mut [u8; ICMP_HLEN] = ptr_at(ctx, l4).ok_or(Counter::PassMalformed)?;
    // SAFETY: bounds checked.
    let kind = unsafe { (*icmp)[0] };
    if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED {
        return Err(Counter::PassNotOurs);
    }
    let q3 = l4 + ICMP_HLEN;
    let inner_ip: *mut Ipv4Hdr = ptr_at(ctx, q3).ok_or(Counter::PassMalformed)?;
    // SAFETY: bounds checked.
    let iph = unsafe { &*inner_ip };
    let ihl = ((iph.vihl & 0x0f) as usize) * 4;
    if iph.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(Counter::PassMalformed);
    }
    if iph.proto as u8 != IPPROTO_TCP {
        return Err(Counter::PassNotOurs);
    }
    // The quote ends where the outer IPv4 packet does, not where the frame does (Ethernet
    // padding follows short packets): nothing past it may be read as quoted data, or changed.
    // SAFETY: bounds checked above.
    let end = l3 + u16::from_be_bytes(unsafe { (*ip).tot_len }) as usize;
    if q3 + ihl + 8 > end {
        return Err(Counter::PassMalformed);
    }
    let inner_l4: *mut [u8; 8] = ptr_at(ctx, q3 + ihl).ok_or(Counter::PassMalformed)?;
    let check_at = q3 + ihl + at::TCP_CHECK as usize;
    let inner_check = if check_at + 2 <= end {
        ptr_at::<[u8; 2], C>(ctx, check_at).unwrap_or(core::ptr::null_mut())
    } else {
        core::ptr::null_mut()
    };
    // SAFETY: bounds checked.
    let (iph, p) = unsafe { (&*inner_ip, *inner_l4) };
    let inner = FlowKey::tcp(
        u32::from_ne_bytes(iph.src_addr),
        u16::from_ne_bytes([p[0], p[1]]),
        u32::from_ne_bytes(iph.dst_addr),
        u16::from_ne_bytes([p[2], p[3]]),
    );
    Ok(IcmpError { eth, ip, icmp, inner_ip, inner_l4, inner_check, inner })
}

#[inline(always)]
pub fn parse<C: Frame>(ctx: &C) -> Result<Parsed, Counter> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Counter::PassMalformed)?;
    // SAFETY: bounds checked by ptr_at.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3 = EthHdr::LEN;
    let mut vlan_tci = 0;
    if ether_type == ETH_P_8021Q {
        // TCI (2 bytes) then the inner EtherType.
        let inner: *const [u8; VLAN_HLEN] = ptr_at(ctx, l3).ok_or(Counter::PassMalformed)?;
        // SAFETY: bounds checked.
        let v = unsafe { *inner };
        vlan_tci = u16::from_ne_bytes([v[0], v[1]]);
        ether_type = u16::from_ne_bytes([v[2], v[3]]);
        l3 += VLAN_HLEN;
    }
    if ether_type != ETH_P_IP {
        return Err(Counter::PassNotOurs);
    }

    let ip: *mut Ipv4Hdr = ptr_at(ctx, l3).ok_or(Counter::PassMalformed)?;
    // SAFETY: bounds checked.
    let iph = unsafe { &*ip };
    if iph.vihl >> 4 != 4 {
        return Err(Counter::PassMalformed);
    }
    let ihl = ((iph.vihl & 0x0f) as usize) * 4;
    let ipb = ip as *const u8;
    // SAFETY: bounds checked (as every access below).
    let ip_len = u16::from_be(unsafe { load16::<{ at::IP_TOT_LEN }>(ipb) });
    // The whole packet, not just its linear part: a GRO aggregate's payload is in pages.
    let frame_l3 = ctx.len().saturating_sub(l3);
    if ihl < Ipv4Hdr::LEN || (ip_len as usize) < ihl || ip_len as usize > frame_l3 {
        return Err(Counter::PassMalformed);
    }
    let proto = iph.proto as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_ICMP {
        return Err(Counter::PassNotOurs);
    }
    // Only the first fragment carries the ports; the rest cannot be matched to a connection
    // without reassembly. TCP sets DF and kpf translates "fragmentation needed" errors, so
    // forwarded connections do not fragment: every fragment goes to the kernel.
    if u16::from_be(unsafe { load16::<{ at::IP_FRAGS }>(ipb) }) & IP_FRAG_MASK != 0 {
        return Err(Counter::PassFragment);
    }
    if proto == IPPROTO_ICMP {
        return Ok(Parsed::Icmp { l4: l3 + ihl });
    }

    let l4 = l3 + ihl;
    let tcp: *mut TcpHdr = ptr_at(ctx, l4).ok_or(Counter::PassMalformed)?;
    let tcpb = tcp as *const u8;
    // SAFETY: bounds checked.
    let [off, flags] = unsafe { load16::<{ at::TCP_OFF_FLAGS }>(tcpb) }.to_ne_bytes();
    let doff = (off >> 4) as usize * 4;
    if doff < TcpHdr::LEN || ihl + doff > ip_len as usize {
        return Err(Counter::PassMalformed);
    }

    // Both ports as one word, in wire order (the key keeps them so).
    // SAFETY: bounds checked.
    let (src, dst, ports) =
        unsafe { (load32::<{ at::IP_SRC }>(ipb), load32::<{ at::IP_DST }>(ipb), load32::<{ at::TCP_PORTS }>(tcpb)) };
    // Port 0 is not a TCP endpoint: no stack sends it, so it is not forwarded (nor tracked).
    if ports & 0xffff == 0 || ports >> 16 == 0 {
        return Err(Counter::PassMalformed);
    }
    let key = FlowKey::tcp_from_wire([src, dst], ports);
    let payload = ip_len - (ihl + doff) as u16;
    Ok(Parsed::Tcp(Packet { eth, ip, tcp, key, flags, ip_len, payload, vlan: l3 != EthHdr::LEN, vlan_tci }))
}
