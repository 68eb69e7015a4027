//! Packet loads and stores of 2 and 4 bytes at any alignment, each one instruction.
//!
//! Header fields are byte arrays (alignment 1), and for the BPF target LLVM splits every access
//! to one into byte loads or stores with shifts: ten instructions for an IPv4 address, and the
//! established path has about a dozen such fields. The verifier accepts unaligned packet access
//! on CPUs that do it efficiently (x86-64 and arm64 among them; alignment is only enforced under
//! BPF_F_STRICT_ALIGNMENT or where the CPU lacks it), so a single instruction is fine. Only inline
//! assembly gets one out of LLVM without an alignment the frame does not promise.
//!
//! Values are in memory order (as `from_ne_bytes` would give them), like every field kpf keeps.
//! The caller must have bounds-checked `[p + OFF, p + OFF + size)` against the end of the frame.

macro_rules! access {
    ($load:ident, $store:ident, $ty:ty, $width:literal) => {
        /// # Safety
        /// `p + OFF` must be in the frame, with the whole value bounds-checked.
        #[inline(always)]
        pub unsafe fn $load<const OFF: i16>(p: *const u8) -> $ty {
            let v: u64;
            // SAFETY: per the caller; a plain load.
            unsafe {
                core::arch::asm!(
                    concat!("{v} = *(", $width, " *)({p} + {off})"),
                    v = out(reg) v,
                    p = in(reg) p,
                    off = const OFF,
                    options(readonly, nostack, preserves_flags),
                );
            }
            v as $ty
        }

        /// # Safety
        /// As for the load.
        #[inline(always)]
        pub unsafe fn $store<const OFF: i16>(p: *mut u8, v: $ty) {
            // SAFETY: per the caller; a plain store.
            unsafe {
                core::arch::asm!(
                    concat!("*(", $width, " *)({p} + {off}) = {v}"),
                    p = in(reg) p,
                    v = in(reg) v as u64,
                    off = const OFF,
                    options(nostack, preserves_flags),
                );
            }
        }
    };
}

access!(load16, store16, u16, "u16");
access!(load32, store32, u32, "u32");

/// Where the fields kpf loads and stores sit, from network-types' header layouts.
pub mod at {
    use core::mem::offset_of;

    use network_types::{ip::Ipv4Hdr, tcp::TcpHdr};

    pub const IP_TOT_LEN: i16 = offset_of!(Ipv4Hdr, tot_len) as i16;
    pub const IP_FRAGS: i16 = offset_of!(Ipv4Hdr, frags) as i16;
    pub const IP_CHECK: i16 = offset_of!(Ipv4Hdr, check) as i16;
    pub const IP_SRC: i16 = offset_of!(Ipv4Hdr, src_addr) as i16;
    pub const IP_DST: i16 = offset_of!(Ipv4Hdr, dst_addr) as i16;
    /// The source port, and with the destination port after it, both as one word.
    pub const TCP_PORTS: i16 = offset_of!(TcpHdr, source) as i16;
    pub const TCP_DST_PORT: i16 = offset_of!(TcpHdr, dest) as i16;
    pub const TCP_SEQ: i16 = offset_of!(TcpHdr, seq) as i16;
    pub const TCP_ACK_SEQ: i16 = offset_of!(TcpHdr, ack_seq) as i16;
    /// The data offset byte, then the flags byte.
    pub const TCP_OFF_FLAGS: i16 = offset_of!(TcpHdr, _bitfield_1) as i16;
    pub const TCP_CHECK: i16 = offset_of!(TcpHdr, check) as i16;
}
