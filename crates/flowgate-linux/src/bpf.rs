//! The `bpf()` system call, only as far as `flowgate check` probes it: can this kernel load a
//! BPF program, and attach one to a raw tracepoint? Kernel-side process attribution
//! ([`crate::owner_bpf`], loaded with aya) needs more (cgroup hooks, BTF tracepoints); this probe
//! tells beforehand whether a host can load BPF at all.
//!
//! This room loads one program that does nothing (`r0 = 0; exit`) and attaches it for as long as
//! the caller keeps the returned descriptors. BPF objects are not per network namespace: they
//! live in the host's kernel, but only while a descriptor holds them, so dropping the descriptors
//! unloads the program and detaches it, and nothing stays behind. No map, no pin, no helper call.
//! The numbers follow `include/uapi/linux/bpf.h`; the attribute structures are the leading
//! fields of `union bpf_attr`, and the kernel treats the fields past the size given as zero.

use std::ffi::CStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

// enum bpf_cmd
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
// enum bpf_prog_type
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;

/// `r0 = 0` (BPF_ALU64 | BPF_MOV | BPF_K), then `exit` (BPF_JMP | BPF_EXIT), as `struct bpf_insn`
/// (code, registers, offset, immediate) in little- or big-endian order alike: only the code byte,
/// which comes first in memory either way, is non-zero.
const NOOP_PROGRAM: [[u8; 8]; 2] = [[0xb7, 0, 0, 0, 0, 0, 0, 0], [0x95, 0, 0, 0, 0, 0, 0, 0]];

/// The name the program shows in `bpftool prog` for the moment it exists.
const PROG_NAME: &[u8] = b"flowgate_check";

/// The `BPF_PROG_LOAD` part of `union bpf_attr`, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The `raw_tracepoint` part of `union bpf_attr` (name, prog_fd; the cookie after them is left
/// out, so kernels that predate it take the same size).
#[repr(C)]
struct RawTracepointAttr {
    name: u64,
    prog_fd: u32,
    _pad: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a live, initialised `repr(C)` structure whose exact size is passed with
    // it; the pointers inside it (set by the callers) point to data that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>() as libc::c_ulong) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(rc).map_err(|_| io::Error::other(format!("bpf(): impossible descriptor {rc}")))?;
    // SAFETY: on success these commands return a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Loads a raw-tracepoint program that does nothing and returns its descriptor (closing it
/// unloads the program). Errors are the kernel's: `ENOSYS` (no `bpf()`), `EPERM` (not allowed:
/// no CAP_BPF/CAP_SYS_ADMIN, or lockdown), `EINVAL` (the program type is unknown, e.g. a kernel
/// without `CONFIG_BPF_EVENTS`).
pub fn load_noop_program() -> io::Result<OwnedFd> {
    let insns = NOOP_PROGRAM;
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_RAW_TRACEPOINT,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..ProgLoadAttr::default()
    };
    attr.prog_name[..PROG_NAME.len()].copy_from_slice(PROG_NAME);
    bpf(BPF_PROG_LOAD, &mut attr)
}

/// Attaches `program` (from [`load_noop_program`]) to the raw tracepoint `tracepoint` (such as
/// `sched_process_exec`) and returns the link's descriptor: the program runs at that tracepoint
/// until the descriptor is closed. `ENOENT`: no such tracepoint.
pub fn attach_raw_tracepoint(program: &OwnedFd, tracepoint: &CStr) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let prog_fd = u32::try_from(program.as_raw_fd()).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    let mut attr = RawTracepointAttr { name: tracepoint.as_ptr() as u64, prog_fd, _pad: 0 };
    bpf(BPF_RAW_TRACEPOINT_OPEN, &mut attr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_layouts_match_the_kernel() {
        // Offsets of union bpf_attr's fields in include/uapi/linux/bpf.h.
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, insns), 8);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, license), 16);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(std::mem::size_of::<RawTracepointAttr>(), 16);
        assert!(PROG_NAME.len() < 16, "the kernel wants room for the NUL");
    }
}
