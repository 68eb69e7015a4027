//! A do-nothing native XDP program (`return XDP_PASS`) to attach to a veth that must receive
//! XDP_TX frames.
//!
//! Why: a frame sent with XDP_TX out of a veth goes into the *peer's* XDP ring, and the kernel
//! (drivers/net/veth.c, `veth_xdp_flush`) only schedules the peer's NAPI to drain that ring when
//! the peer has an XDP program of its own ("xdp_ring is initialized on receive side?"). A peer
//! whose NAPI exists only because of `gro on` gets the frames queued but never polled for them,
//! until some unrelated packet sent through the veth happens to kick its NAPI. Redirects
//! (`ndo_xdp_xmit` with XDP_XMIT_FLUSH) do kick the peer's NAPI, so only XDP_TX needs this.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::netns::Netns;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<OwnedFd> {
    // SAFETY: attr is a zero-padded bpf_attr of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// An attached XDP_PASS program; detached when dropped (or when its interface goes away).
#[derive(Debug)]
pub struct XdpPass {
    _link: OwnedFd,
}

/// Attaches `return XDP_PASS` in native (driver) mode to `dev` in `ns`.
pub fn attach_pass(ns: &Netns, dev: &str) -> io::Result<XdpPass> {
    // r0 = XDP_PASS (2); exit
    let insns: [u8; 16] = [0xb7, 0, 0, 0, 2, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    let license = b"GPL\0";
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[48..52].copy_from_slice(b"pass");
    attr[68..72].copy_from_slice(&BPF_XDP.to_ne_bytes());
    let prog = bpf(BPF_PROG_LOAD, &mut attr).map_err(|e| io::Error::new(e.kind(), format!("loading XDP_PASS: {e}")))?;

    let name = CString::new(dev).map_err(|_| io::Error::other("bad interface name"))?;
    let link = ns.enter(|| {
        // SAFETY: a valid C string; if_nametoindex resolves in this thread's namespace.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        attr[8..12].copy_from_slice(&BPF_XDP.to_ne_bytes());
        // flags 0: driver mode where the driver has it (veth does).
        bpf(BPF_LINK_CREATE, &mut attr)
    })?;
    let link =
        link.map_err(|e| io::Error::new(e.kind(), format!("attaching XDP_PASS to {dev} in {}: {e}", ns.name())))?;
    Ok(XdpPass { _link: link })
}
