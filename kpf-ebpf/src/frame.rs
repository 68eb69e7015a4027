//! The two attach points kpf runs at, behind one interface: XDP (native or generic), where the
//! program sees raw frames, and tc (tcx ingress), where it sees socket buffers, which keep
//! GRO/GSO aggregates whole and carry the kernel's checksum state. Parsing, conntrack and NAT are
//! the same code for both; only reading the frame, the checksum update and the way out differ.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_PSEUDO_HDR, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::generated::{bpf_l4_csum_replace, bpf_redirect},
    programs::{TcContext, XdpContext},
};
use kpf_common::{
    Counter, NextHop,
    nat::{self, L4Csum, Nat},
};
use network_types::eth::EthHdr;

use crate::{
    access::{at, load16, store16, store32},
    maps::{DEVMAP, IFACES},
    parse::Packet,
};

pub trait Frame {
    /// The verdict that hands the packet to the kernel untouched.
    const PASS: u32;
    const DROP: u32;

    /// Start and end of the directly readable bytes.
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The whole packet's length: more than `data_end - data` for a socket buffer whose payload
    /// is in pages (every GRO aggregate).
    fn len(&self) -> usize;
    fn ingress_ifindex(&self) -> u32;
    /// The context pointer, for helpers such as bpf_fib_lookup that take either kind.
    fn as_ptr(&self) -> *mut core::ffi::c_void;

    /// Whether a packet can leave through `ifindex` (and its replies be seen by kpf).
    fn can_send(&self, ifindex: u32) -> bool;

    /// Rewrites `pkt` per `nat` (addresses, ports, every checksum, MACs) and sends it toward `nh`.
    /// The last thing done with the packet: afterwards no pointer into it may be used.
    fn forward(&self, pkt: &Packet, nat: &Nat, nh: &NextHop) -> Result<u32, Counter>;

    /// Sends a frame whose IP and transport headers are already rewritten (checksums included).
    fn send_frame(&self, eth: *mut EthHdr, nh: &NextHop) -> Result<u32, Counter>;
}

/// Addresses, ports and the IPv4 header checksum, as the model in `kpf_common::nat`'s tests does,
/// one instruction per field (see access.rs).
#[inline(always)]
fn rewrite_fields(pkt: &Packet, nat: &Nat) {
    let (ip, tcp) = (pkt.ip as *mut u8, pkt.tcp as *mut u8);
    // SAFETY: parse bounds-checked both headers (IPv4 without options and the fixed TCP header).
    unsafe {
        store32::<{ at::IP_SRC }>(ip, nat.src_addr);
        store32::<{ at::IP_DST }>(ip, nat.dst_addr);
        store16::<{ at::IP_CHECK }>(ip, nat::ip_check(nat, load16::<{ at::IP_CHECK }>(ip)));
        store16::<{ at::TCP_PORTS }>(tcp, nat.src_port);
        store16::<{ at::TCP_DST_PORT }>(tcp, nat.dst_port);
    }
}

#[inline(always)]
fn set_macs(eth: *mut EthHdr, nh: &NextHop) {
    // SAFETY: parse bounds-checked the Ethernet header.
    let eth = unsafe { &mut *eth };
    eth.src_addr = nh.src_mac;
    eth.dst_addr = nh.dst_mac;
}

/// An XDP context, and what its frames are: native XDP (`SKB = false`) sees frames straight from
/// a driver, generic XDP (`SKB = true`) sees socket buffers. The two programs differ only in how
/// they read the TCP checksum field (see [`Xdp::l4_csum`]).
pub struct Xdp<const SKB: bool>(pub XdpContext);

impl<const SKB: bool> Xdp<SKB> {
    /// A driver's frame came off a wire, or from a peer that completed its checksum: complete
    /// (see README, "Checksums"). A socket buffer may be CHECKSUM_PARTIAL, whose field holds the
    /// pseudo-header sum: the field itself tells which (`nat::skb_l4_csum`).
    #[inline(always)]
    fn l4_csum(pkt: &Packet, check: u16) -> L4Csum {
        if !SKB {
            return L4Csum::Full;
        }
        // The IPv4 header's length as parse found it, from where it put the TCP header.
        let ihl = (pkt.tcp as usize - pkt.ip as usize) as u16;
        nat::skb_l4_csum(check, pkt.key.src_addr, pkt.key.dst_addr, pkt.ip_len - ihl)
    }
}

impl<const SKB: bool> Frame for Xdp<SKB> {
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;

    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.0.data_end() - self.0.data()
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        self.0.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn as_ptr(&self) -> *mut core::ffi::c_void {
        self.0.as_ptr()
    }

    #[inline(always)]
    fn can_send(&self, ifindex: u32) -> bool {
        ifindex == Frame::ingress_ifindex(self) || DEVMAP.get_ifindex(ifindex).is_some()
    }

    #[inline(always)]
    fn forward(&self, pkt: &Packet, nat: &Nat, nh: &NextHop) -> Result<u32, Counter> {
        rewrite_fields(pkt, nat);
        let tcp = pkt.tcp as *mut u8;
        // SAFETY: parse bounds-checked the TCP header.
        unsafe {
            let check = load16::<{ at::TCP_CHECK }>(tcp);
            store16::<{ at::TCP_CHECK }>(tcp, nat::tcp_check(nat, check, Self::l4_csum(pkt, check)));
        }
        self.send_frame(pkt.eth, nh)
    }

    /// XDP_TX back out the interface the frame came in on, or a devmap redirect.
    #[inline(always)]
    fn send_frame(&self, eth: *mut EthHdr, nh: &NextHop) -> Result<u32, Counter> {
        set_macs(eth, nh);
        if nh.ifindex == Frame::ingress_ifindex(self) {
            return Ok(xdp_action::XDP_TX);
        }
        DEVMAP.redirect(nh.ifindex, 0).map_err(|_| Counter::DropRedirectFailed)
    }
}

impl Frame for TcContext {
    /// TCX_NEXT: not TC_ACT_OK (TCX_PASS), which would also skip any tcx program attached after
    /// kpf's (a CNI's, say); the last program's "next" is the kernel's normal path.
    const PASS: u32 = TC_ACT_UNSPEC as u32;
    const DROP: u32 = TC_ACT_SHOT as u32;

    // Volatile reads: otherwise LLVM may load these in a caller and pass them into a separate BPF
    // function (icmp::translate) as plain integers, whose zero-extension there is pointer
    // arithmetic on pkt_end, which the verifier rejects.
    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: the live __sk_buff context.
        unsafe { core::ptr::read_volatile(&(*self.skb.skb).data) as usize }
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&(*self.skb.skb).data_end) as usize }
    }

    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: the live __sk_buff context.
        unsafe { (*self.skb.skb).ingress_ifindex }
    }

    #[inline(always)]
    fn as_ptr(&self) -> *mut core::ffi::c_void {
        EbpfContext::as_ptr(self)
    }

    /// Any interface kpf is attached to (so that replies come back through kpf).
    #[inline(always)]
    fn can_send(&self, ifindex: u32) -> bool {
        // SAFETY: plain data, only tested for presence.
        ifindex == Frame::ingress_ifindex(self) || unsafe { IFACES.get(ifindex) }.is_some()
    }

    /// Addresses, ports, MACs and the IPv4 checksum are written directly. The TCP checksum goes
    /// through bpf_l4_csum_replace, which knows what this packet's checksum field holds (complete,
    /// or a CHECKSUM_PARTIAL pseudo-header sum that the stack or the NIC completes, as every GSO
    /// aggregate has) and keeps a CHECKSUM_COMPLETE skb->csum right: the pseudo-header delta
    /// (addresses) and the port delta are applied separately for that reason.
    #[inline(always)]
    fn forward(&self, pkt: &Packet, nat: &Nat, nh: &NextHop) -> Result<u32, Counter> {
        let check_at = (pkt.tcp as usize - Frame::data(self) + at::TCP_CHECK as usize) as u32;
        rewrite_fields(pkt, nat);
        set_macs(pkt.eth, nh);
        // SAFETY: the live skb; the helpers bounds-check the offset. No packet pointer is used
        // after them (they may move the data).
        unsafe {
            let ctx = self.skb.skb as *mut _;
            if bpf_l4_csum_replace(ctx, check_at, 0, nat.pseudo_delta as u64, BPF_F_PSEUDO_HDR as u64) != 0
                || bpf_l4_csum_replace(ctx, check_at, 0, nat::port_delta(nat) as u64, 0) != 0
            {
                return Err(Counter::DropRedirectFailed);
            }
        }
        Ok(redirect(nh.ifindex))
    }

    /// A redirect to the egress of the next hop's interface (the one it came in on included).
    #[inline(always)]
    fn send_frame(&self, eth: *mut EthHdr, nh: &NextHop) -> Result<u32, Counter> {
        set_macs(eth, nh);
        Ok(redirect(nh.ifindex))
    }
}

#[inline(always)]
fn redirect(ifindex: u32) -> u32 {
    // SAFETY: plain helper; it returns TC_ACT_REDIRECT, or TC_ACT_SHOT for bad flags.
    let rc = unsafe { bpf_redirect(ifindex, 0) };
    if rc == TC_ACT_REDIRECT as i64 { TC_ACT_REDIRECT as u32 } else { TC_ACT_SHOT as u32 }
}
