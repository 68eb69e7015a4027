//! Baselines for program cost, loaded with raw bpf(2) (as `kpf_tests::xdp` does) and run through
//! BPF_PROG_TEST_RUN exactly like kpf's program:
//! - an XDP program that only returns XDP_PASS: the fixed cost of a test run (context set-up,
//!   the timer, the loop), which every kpf figure includes;
//! - one that does a single lookup (a hit) in an LRU hash map shaped like kpf's conntrack table,
//!   then returns XDP_PASS: the price of one map lookup here, to read kpf's figures in units of
//!   map operations;
//! - two *floors* ([`Floor`]): programs that make exactly the map operations and helper calls
//!   kpf's established and new-flow paths cannot do without, in maps of kpf's shapes, and nothing
//!   else (no parsing, no rewriting, no conntrack logic). What kpf costs beyond a floor is its
//!   own code (with its map accesses the verifier inlines); the floor itself is the kernel's
//!   price for those operations on this machine, plus the test run's fixed cost.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use kpf_common::{Flow, FlowKey, Frontend, FrontendKey};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_MAP_TYPE_DEVMAP_HASH: u32 = 25;
const BPF_NOEXIST: i32 = 1;
const BPF_XDP: u32 = 37;
/// The loopback device: present in every namespace, so a devmap can always hold it. The floors
/// never transmit (a test run only returns the verdict), so where it leads does not matter.
const LOOPBACK: u32 = 1;
const FLOW_KEY: usize = std::mem::size_of::<FlowKey>();
const FLOW: usize = std::mem::size_of::<Flow>();

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

/// A loaded (not attached) baseline program (and the maps it uses).
pub struct RawXdp {
    fd: OwnedFd,
    _maps: Vec<OwnedFd>,
    /// The table the program inserts into, if it does.
    inserts_into: Option<OwnedFd>,
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

fn map_create(kind: u32, key: usize, value: usize, entries: u32, flags: u32) -> io::Result<OwnedFd> {
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, kind);
    put_u32(&mut attr, 4, key as u32);
    put_u32(&mut attr, 8, value as u32);
    put_u32(&mut attr, 12, entries);
    put_u32(&mut attr, 16, flags);
    let fd = bpf(BPF_MAP_CREATE, &mut attr)
        .map_err(|e| io::Error::new(e.kind(), format!("creating a baseline map (type {kind}): {e}")))?;
    // SAFETY: a new fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn map_update(map: &OwnedFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, map.as_raw_fd() as u32);
    put_u64(&mut attr, 8, key.as_ptr() as u64);
    put_u64(&mut attr, 16, value.as_ptr() as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Deletes every entry of a map with `key`-byte keys.
fn map_clear(map: &OwnedFd, key: usize) -> io::Result<()> {
    let mut k = vec![0u8; key];
    loop {
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, map.as_raw_fd() as u32);
        put_u64(&mut attr, 16, k.as_mut_ptr() as u64);
        // A null key asks for the first one.
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, map.as_raw_fd() as u32);
        put_u64(&mut attr, 8, k.as_ptr() as u64);
        bpf(BPF_MAP_DELETE_ELEM, &mut attr)?;
    }
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
const STX_W: u8 = 0x63;
const STX_DW: u8 = 0x7b;
const LD_IMM64: u8 = 0x18;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const PSEUDO_MAP_FD: u8 = 1;
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_MAP_UPDATE_ELEM: i32 = 2;
const HELPER_GET_PRANDOM_U32: i32 = 7;
const HELPER_REDIRECT_MAP: i32 = 51;
const FP: u8 = 10;
const XDP_PASS: i32 = 2;

/// `r{reg} = map`: the two-slot load of a map's fd.
fn ld_map(reg: u8, map: &OwnedFd) -> [[u8; 8]; 2] {
    [insn(LD_IMM64, reg, PSEUDO_MAP_FD, 0, map.as_raw_fd()), insn(0, 0, 0, 0, 0)]
}

/// Instructions for `bpf_map_lookup_elem(map, fp + key)`, the result ignored.
fn lookup(map: &OwnedFd, key: i16) -> Vec<[u8; 8]> {
    let mut p = ld_map(1, map).to_vec();
    p.extend([insn(MOV64_REG, 2, FP, 0, 0), insn(ADD64_IMM, 2, 0, 0, key.into()), insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM)]);
    p
}

/// `bpf_map_update_elem(map, fp + key, fp + value, flags)`, the result ignored.
fn update(map: &OwnedFd, key: i16, value: i16, flags: i32) -> Vec<[u8; 8]> {
    let mut p = ld_map(1, map).to_vec();
    p.extend([
        insn(MOV64_REG, 2, FP, 0, 0),
        insn(ADD64_IMM, 2, 0, 0, key.into()),
        insn(MOV64_REG, 3, FP, 0, 0),
        insn(ADD64_IMM, 3, 0, 0, value.into()),
        insn(MOV64_IMM, 4, 0, 0, flags),
        insn(CALL, 0, 0, 0, HELPER_MAP_UPDATE_ELEM),
    ]);
    p
}

/// `return bpf_redirect_map(devmap, LOOPBACK, 0)` (XDP_REDIRECT).
fn redirect(devmap: &OwnedFd) -> Vec<[u8; 8]> {
    let mut p = ld_map(1, devmap).to_vec();
    p.extend([
        insn(MOV64_IMM, 2, 0, 0, LOOPBACK as i32),
        insn(MOV64_IMM, 3, 0, 0, 0),
        insn(CALL, 0, 0, 0, HELPER_REDIRECT_MAP),
        insn(EXIT, 0, 0, 0, 0),
    ]);
    p
}

/// Zeroes `len` bytes (a multiple of 8) of stack below `fp + at + len`, with r1 = 0.
fn zero_stack(at: i16, len: usize) -> Vec<[u8; 8]> {
    let mut p = vec![insn(MOV64_IMM, 1, 0, 0, 0)];
    p.extend((0..len as i16 / 8).map(|i| insn(STX_DW, FP, 1, at + 8 * i, 0)));
    p
}

/// The size and creation flags of one of kpf's conntrack tables, as its loaded program has them.
#[derive(Clone, Copy, Debug)]
pub struct TableShape {
    pub entries: u32,
    pub flags: u32,
}

/// A map shaped like kpf's conntrack table `t`: an LRU hash of FlowKey -> Flow.
fn conntrack_map(t: TableShape) -> io::Result<OwnedFd> {
    map_create(BPF_MAP_TYPE_LRU_HASH, FLOW_KEY, FLOW, t.entries, t.flags)
}

/// kpf's devmap shape (ifindex -> struct bpf_devmap_val: ifindex, program fd), holding
/// [`LOOPBACK`] with no program (fd 0).
fn devmap() -> io::Result<OwnedFd> {
    let map = map_create(BPF_MAP_TYPE_DEVMAP_HASH, 4, 8, 64, 0)?;
    let value = (LOOPBACK as u64).to_ne_bytes();
    map_update(&map, &LOOPBACK.to_ne_bytes(), &value)
        .map_err(|e| io::Error::new(e.kind(), format!("putting the loopback device into a devmap: {e}")))?;
    Ok(map)
}

impl RawXdp {
    /// `return XDP_PASS`.
    pub fn pass() -> io::Result<RawXdp> {
        Ok(RawXdp { fd: load(b"kpfb_empty", &[insn(MOV64_IMM, 0, 0, 0, XDP_PASS), insn(EXIT, 0, 0, 0, 0)])?, _maps: vec![], inserts_into: None })
    }

    /// Looks the all-zero key up in a map shaped like kpf's conntrack `table` that holds it,
    /// then `return XDP_PASS`.
    pub fn lru_lookup(table: TableShape) -> io::Result<RawXdp> {
        let map = conntrack_map(table)?;
        map_update(&map, &[0; FLOW_KEY], &[0; FLOW])?;
        let mut prog = zero_stack(-(FLOW_KEY as i16), FLOW_KEY);
        prog.extend(lookup(&map, -(FLOW_KEY as i16)));
        prog.extend([insn(MOV64_IMM, 0, 0, 0, XDP_PASS), insn(EXIT, 0, 0, 0, 0)]);
        Ok(RawXdp { fd: load(b"kpfb_lookup", &prog)?, _maps: vec![map], inserts_into: None })
    }

    /// The floor of kpf's established path: one conntrack lookup (a hit) and a devmap redirect.
    /// Returns XDP_REDIRECT.
    pub fn floor_established(flows: TableShape) -> io::Result<RawXdp> {
        let (map, devmap) = (conntrack_map(flows)?, devmap()?);
        map_update(&map, &[0; FLOW_KEY], &[0; FLOW])?;
        let mut prog = zero_stack(-(FLOW_KEY as i16), FLOW_KEY);
        prog.extend(lookup(&map, -(FLOW_KEY as i16)));
        prog.extend(redirect(&devmap));
        Ok(RawXdp { fd: load(b"kpfb_floor_est", &prog)?, _maps: vec![map, devmap], inserts_into: None })
    }

    /// The floor of kpf's new-flow path, operation for operation as its SYN to an address-specific
    /// frontend makes them (its per-CPU array lookups, which the verifier inlines, left out): a
    /// random number (which SNAT port to try first); conntrack lookups that miss (the established
    /// table, the half-open table); the frontend (a hit); whether the egress is in the devmap (a
    /// hit); the established table for the SNAT port's reply tuple (a miss); the half-open table's
    /// two inserts, the reply tuple's with BPF_NOEXIST (the port claim); a devmap redirect.
    /// Every run inserts a new random tuple pair; [`RawXdp::clear`] empties the half-open table.
    /// Returns XDP_REDIRECT.
    pub fn floor_new_flow(flows: TableShape, half_open: TableShape, frontends: u32) -> io::Result<RawXdp> {
        const FRONTEND_KEY: usize = std::mem::size_of::<FrontendKey>();
        let (established, handshakes, devmap) = (conntrack_map(flows)?, conntrack_map(half_open)?, devmap()?);
        let fe = map_create(BPF_MAP_TYPE_HASH, FRONTEND_KEY, std::mem::size_of::<Frontend>(), frontends, 0)?;
        map_update(&fe, &[0; FRONTEND_KEY], &[0; std::mem::size_of::<Frontend>()])?;
        // Stack: the original tuple at fp-16, the reply tuple at fp-32, the frontend key below
        // it, the devmap key (u32) below that, then the entry both inserts write.
        let (orig, reply) = (-16i16, -32i16);
        let fe_key = reply - FRONTEND_KEY as i16;
        let dev_key = fe_key - 8;
        let value = dev_key - FLOW as i16;
        // The random number stays in r0 while the stack is zeroed (with r1).
        let mut prog = vec![insn(CALL, 0, 0, 0, HELPER_GET_PRANDOM_U32)];
        prog.extend(zero_stack(value, (-value) as usize));
        prog.extend([
            insn(MOV64_IMM, 1, 0, 0, 1),
            // The reply tuple differs from the original in its second word.
            insn(STX_DW, FP, 1, reply + 8, 0),
            insn(MOV64_IMM, 1, 0, 0, LOOPBACK as i32),
            insn(STX_W, FP, 1, dev_key, 0),
            insn(STX_W, FP, 0, orig, 0),
            insn(STX_W, FP, 0, reply, 0),
        ]);
        prog.extend(lookup(&established, orig));
        prog.extend(lookup(&handshakes, orig));
        prog.extend(lookup(&fe, fe_key));
        prog.extend(lookup(&devmap, dev_key));
        prog.extend(lookup(&established, reply));
        prog.extend(update(&handshakes, reply, value, BPF_NOEXIST));
        prog.extend(update(&handshakes, orig, value, 0));
        prog.extend(redirect(&devmap));
        let fd = load(b"kpfb_floor_new", &prog)?;
        Ok(RawXdp { fd, _maps: vec![established, fe, devmap], inserts_into: Some(handshakes) })
    }

    /// Empties the table the program inserts into (nothing to do for the others).
    pub fn clear(&self) -> io::Result<()> {
        match &self.inserts_into {
            Some(map) => map_clear(map, FLOW_KEY),
            None => Ok(()),
        }
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
