//! Baselines for program cost, loaded with raw bpf(2) (as `kpf_tests::xdp` does) and run through
//! BPF_PROG_TEST_RUN exactly like kpf's program:
//! - an XDP program that only returns XDP_PASS: the fixed cost of a test run (context set-up,
//!   the timer, the loop), which every kpf figure includes;
//! - one that does a single lookup (a hit) in an LRU hash map shaped like kpf's conntrack table
//!   (16-byte key, 80-byte value), then returns XDP_PASS: the price of one map lookup here, to
//!   read kpf's figures in units of map operations.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_XDP: u32 = 37;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<i64> {
    // SAFETY: attr is a zero-padded bpf_attr of the size passed; pointers inside it are valid
    // for the duration of the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

fn put_u32(a: &mut [u8; 128], at: usize, v: u32) {
    a[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(a: &mut [u8; 128], at: usize, v: u64) {
    a[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

fn get_u32(a: &[u8; 128], at: usize) -> u32 {
    u32::from_ne_bytes(a[at..at + 4].try_into().expect("4 bytes"))
}

/// A loaded (not attached) baseline program (and the map it uses, if any).
pub struct RawXdp {
    fd: OwnedFd,
    _map: Option<OwnedFd>,
}

/// One BPF_PROG_TEST_RUN: the program's return value and the kernel's mean ns per run.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub retval: u32,
    pub duration_ns: u32,
}

fn load(name: &[u8], insns: &[[u8; 8]]) -> io::Result<OwnedFd> {
    let code: Vec<u8> = insns.iter().flatten().copied().collect();
    let license = b"GPL\0";
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, BPF_PROG_TYPE_XDP);
    put_u32(&mut attr, 4, insns.len() as u32);
    put_u64(&mut attr, 8, code.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    attr[48..48 + name.len().min(15)].copy_from_slice(&name[..name.len().min(15)]);
    put_u32(&mut attr, 68, BPF_XDP);
    let fd = bpf(BPF_PROG_LOAD, &mut attr)
        .map_err(|e| io::Error::new(e.kind(), format!("loading a baseline XDP program: {e}")))?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// One eBPF instruction: opcode, dst and src registers, offset, immediate.
const fn insn(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let o = off.to_le_bytes();
    let i = imm.to_le_bytes();
    [op, (src << 4) | dst, o[0], o[1], i[0], i[1], i[2], i[3]]
}

const MOV64_IMM: u8 = 0xb7;
const MOV64_REG: u8 = 0xbf;
const ADD64_IMM: u8 = 0x07;
const STX_DW: u8 = 0x7b;
const LD_IMM64: u8 = 0x18;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const PSEUDO_MAP_FD: u8 = 1;
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;

impl RawXdp {
    /// `return XDP_PASS`.
    pub fn pass() -> io::Result<RawXdp> {
        Ok(RawXdp { fd: load(b"kpfb_empty", &[insn(MOV64_IMM, 0, 0, 0, 2), insn(EXIT, 0, 0, 0, 0)])?, _map: None })
    }

    /// Looks the all-zero 16-byte key up in an LRU hash map (key 16, value 80 bytes, `entries`
    /// entries: kpf's conntrack shape) that holds it, then `return XDP_PASS`.
    pub fn lru_lookup(entries: u32) -> io::Result<RawXdp> {
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, BPF_MAP_TYPE_LRU_HASH);
        put_u32(&mut attr, 4, 16);
        put_u32(&mut attr, 8, 80);
        put_u32(&mut attr, 12, entries);
        let map = bpf(BPF_MAP_CREATE, &mut attr)
            .map_err(|e| io::Error::new(e.kind(), format!("creating an LRU hash: {e}")))?;
        // SAFETY: a new fd nothing else owns.
        let map = unsafe { OwnedFd::from_raw_fd(map as i32) };
        let (key, value) = ([0u8; 16], [0u8; 80]);
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, map.as_raw_fd() as u32);
        put_u64(&mut attr, 8, key.as_ptr() as u64);
        put_u64(&mut attr, 16, value.as_ptr() as u64);
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr)?;
        let fd = map.as_raw_fd();
        let prog = [
            insn(MOV64_IMM, 1, 0, 0, 0),
            insn(STX_DW, 10, 1, -16, 0),
            insn(STX_DW, 10, 1, -8, 0),
            insn(MOV64_REG, 2, 10, 0, 0),
            insn(ADD64_IMM, 2, 0, 0, -16),
            insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, fd),
            insn(0, 0, 0, 0, 0),
            insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),
            insn(MOV64_IMM, 0, 0, 0, 2),
            insn(EXIT, 0, 0, 0, 0),
        ];
        Ok(RawXdp { fd: load(b"kpfb_lookup", &prog)?, _map: Some(map) })
    }

    /// Runs the program `repeat` times on `data` with `ctx` (a `struct xdp_md`), as aya's
    /// `test_run` does for kpf's program (data out buffer included).
    pub fn test_run(&self, data: &[u8], ctx: &[u8], repeat: u32) -> io::Result<Run> {
        let mut out = vec![0u8; data.len() + 256];
        // struct bpf_attr.test: prog_fd, retval, data_size_in, data_size_out, data_in, data_out,
        // repeat, duration, ctx_size_in, ctx_size_out, ctx_in, ctx_out, flags, cpu, batch_size.
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, self.fd.as_raw_fd() as u32);
        put_u32(&mut attr, 8, data.len() as u32);
        put_u32(&mut attr, 12, out.len() as u32);
        put_u64(&mut attr, 16, data.as_ptr() as u64);
        put_u64(&mut attr, 24, out.as_mut_ptr() as u64);
        put_u32(&mut attr, 32, repeat);
        put_u32(&mut attr, 40, ctx.len() as u32);
        put_u64(&mut attr, 48, ctx.as_ptr() as u64);
        bpf(BPF_PROG_TEST_RUN, &mut attr)?;
        Ok(Run { retval: get_u32(&attr, 4), duration_ns: get_u32(&attr, 36) })
    }
}

/// The `struct xdp_md` context BPF_PROG_TEST_RUN takes: data, data_end, data_meta,
/// ingress_ifindex, rx_queue_index, egress_ifindex (same as the fixture harness passes).
pub fn xdp_md(data_len: usize, ingress: u32) -> Vec<u8> {
    [0u32, data_len as u32, 0, ingress, 0, 0].iter().flat_map(|w| w.to_ne_bytes()).collect()
}
