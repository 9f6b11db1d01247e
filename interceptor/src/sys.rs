//! The system calls the loader issues itself. This is the crate's only unsafe code.
//!
//! - BPF_LINK_CREATE and BPF_OBJ_PIN: aya 0.14 creates bpf_links for cgroup programs but
//!   cannot hand out the link of a `cgroup/getsockopt` program as a pinnable `FdLink`; doing
//!   the two calls here gives every program one code path (a zeroed, correctly sized
//!   `union bpf_attr`).
//! - BPF_LINK_UPDATE, BPF_OBJ_GET, BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD: `upgrade`
//!   swaps the program of a pinned link in place, which aya 0.14 does not offer (its `FdLink`
//!   does not lend its fd), and it needs the old program's fd to make the swap conditional.
//! - BPF_PROG_LOAD of tiny probe programs, BPF_LINK_CREATE against no target and
//!   BPF_LINK_UPDATE of no link: `interceptor check` (`features.rs`) asks the kernel for each
//!   hook, helper and link kind by its exact program type and expected attach type, which
//!   aya's probes do not take.
//! - BPF_PROG_ATTACH of the kernel-forwarding verdict program to its pinned map: aya's
//!   attachment would detach it again when dropped.
//! - setrlimit(RLIMIT_MEMLOCK): kernels before 5.11 charge bpf programs and maps to it (a
//!   64 KiB default), so probes and loads fail with EPERM once a few are alive.
//! - pidfd_open / pidfd_getfd: to take a copy of the proxy's inbound listening socket from
//!   its process, so the proxy itself needs no access to bpf.
//! - ioctl NS_GET_NSTYPE and SIOCGSKNS: to check that a path is a network namespace and which
//!   namespace a socket belongs to; getsockopt SO_PROTOCOL (which nix does not offer): that a
//!   listener to register is TCP.
#![allow(unsafe_code)]

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    os::unix::ffi::OsStrExt as _,
    path::Path,
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `BPF_LINK_UPDATE` flag: replace only if the link still runs `old_prog_fd`'s program.
const BPF_F_REPLACE: u32 = 1 << 2;

/// `enum bpf_attach_type` values of the programs we attach.
#[derive(Clone, Copy, Debug)]
#[repr(u32)]
pub enum AttachType {
    SockOps = 3,
    SkSkbStreamVerdict = 5,
    Inet4Connect = 10,
    Inet6Connect = 11,
    CgroupGetsockopt = 21,
    CgroupSetsockopt = 22,
    Inet4Getpeername = 29,
    Inet6Getpeername = 30,
    SkLookup = 36,
}

/// `enum bpf_prog_type` values of the programs we load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ProgType {
    SockOps = 13,
    SkSkb = 14,
    CgroupSockAddr = 18,
    CgroupSockopt = 25,
    SkLookup = 30,
}

/// Large enough for every `union bpf_attr` member we use; the kernel checks that the bytes
/// past the fields it knows are zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, zero-initialised buffer of the size we pass.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Attaches a loaded program to a cgroup as a bpf_link (which, for cgroups, runs alongside
/// the programs others attached) and returns the link's fd.
pub fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    kind: AttachType,
) -> io::Result<OwnedFd> {
    let mut attr = Attr([0; 128]);
    attr.0[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr.0[4..8].copy_from_slice(&(cgroup.as_raw_fd() as u32).to_ne_bytes());
    attr.0[8..12].copy_from_slice(&(kind as u32).to_ne_bytes());
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: on success the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches a loaded `sk_skb` program to a sockmap or sockhash (BPF_PROG_ATTACH: this kernel
/// generation has no bpf_link for it). The map holds the program, replacing the one it had;
/// sockets already in the map keep the program they were inserted with.
pub fn prog_attach_map(
    prog: BorrowedFd<'_>,
    map: BorrowedFd<'_>,
    kind: AttachType,
) -> io::Result<()> {
    let mut attr = Attr([0; 128]);
    attr.0[0..4].copy_from_slice(&(map.as_raw_fd() as u32).to_ne_bytes());
    attr.0[4..8].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr.0[8..12].copy_from_slice(&(kind as u32).to_ne_bytes());
    bpf(BPF_PROG_ATTACH, &mut attr).map(|_| ())
}

/// Pins a bpf object (here: a link) at `path` on a bpf filesystem.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut attr = Attr([0; 128]);
    attr.0[0..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    attr.0[8..12].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Opens the bpf object (link, map, program) pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut attr = Attr([0; 128]);
    attr.0[0..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: on success the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A new fd for the loaded program with id `id`.
pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr([0; 128]);
    attr.0[0..4].copy_from_slice(&id.to_ne_bytes());
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: on success the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_OBJ_GET_INFO_BY_FD into `buf` (the kernel fills at most `buf.len()` bytes).
fn obj_info(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<()> {
    let mut attr = Attr([0; 128]);
    attr.0[0..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr.0[4..8].copy_from_slice(&(buf.len() as u32).to_ne_bytes());
    attr.0[8..16].copy_from_slice(&(buf.as_mut_ptr() as u64).to_ne_bytes());
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(|_| ())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

/// The head of `struct bpf_link_info`: which link this is and which program it runs.
#[derive(Clone, Copy, Debug)]
pub struct LinkInfo {
    pub id: u32,
    pub prog_id: u32,
}

pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // type, id, prog_id: the kernel copies only the bytes we ask for.
    let mut buf = [0u8; 12];
    obj_info(link, &mut buf)?;
    Ok(LinkInfo {
        id: u32_at(&buf, 4),
        prog_id: u32_at(&buf, 8),
    })
}

/// The head of `struct bpf_prog_info` up to the program's name.
#[derive(Clone, Debug)]
pub struct ProgInfo {
    pub id: u32,
    /// The kernel's tag: a hash of the program's instructions (equal for equal code).
    pub tag: [u8; 8],
    pub name: String,
}

pub fn prog_info(prog: BorrowedFd<'_>) -> io::Result<ProgInfo> {
    // type u32, id u32, tag [8], jited/xlated lens, four pointers and counts, name [16] at 64.
    // The pointers stay 0, so the kernel copies no instructions and no map ids.
    let mut buf = [0u8; 80];
    obj_info(prog, &mut buf)?;
    let name = &buf[64..80];
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    Ok(ProgInfo {
        id: u32_at(&buf, 4),
        tag: buf[8..16].try_into().expect("8 bytes"),
        name: String::from_utf8_lossy(&name[..end]).into_owned(),
    })
}

/// BPF_LINK_UPDATE: makes the link run `new_prog` instead of `old_prog`, atomically (a
/// program runs either the old or the new program, never neither). Fails with EPERM when
/// the link no longer runs `old_prog` (someone else changed it), ENOLINK when the link's
/// target (cgroup, network namespace) is gone, EINVAL when the program type differs.
pub fn link_update(
    link: BorrowedFd<'_>,
    new_prog: BorrowedFd<'_>,
    old_prog: BorrowedFd<'_>,
) -> io::Result<()> {
    let mut attr = Attr([0; 128]);
    attr.0[0..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    attr.0[4..8].copy_from_slice(&(new_prog.as_raw_fd() as u32).to_ne_bytes());
    attr.0[8..12].copy_from_slice(&BPF_F_REPLACE.to_ne_bytes());
    attr.0[12..16].copy_from_slice(&(old_prog.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// BPF_PROG_LOAD of `insns` (raw 8-byte instructions) as a GPL program of `prog_type`
/// expecting `attach` (0 for types that take none), with the verifier's log in `log`.
/// The program is unloaded when the returned fd is dropped; nothing is attached.
pub fn prog_load(
    prog_type: ProgType,
    attach: u32,
    insns: &[u64],
    log: &mut [u8],
) -> io::Result<OwnedFd> {
    const LICENSE: &[u8] = b"GPL\0";
    let mut attr = Attr([0; 128]);
    attr.0[0..4].copy_from_slice(&(prog_type as u32).to_ne_bytes());
    attr.0[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
    attr.0[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr.0[16..24].copy_from_slice(&(LICENSE.as_ptr() as u64).to_ne_bytes());
    if !log.is_empty() {
        attr.0[24..28].copy_from_slice(&1u32.to_ne_bytes());
        attr.0[28..32].copy_from_slice(&(log.len() as u32).to_ne_bytes());
        attr.0[32..40].copy_from_slice(&(log.as_mut_ptr() as u64).to_ne_bytes());
    }
    attr.0[68..72].copy_from_slice(&attach.to_ne_bytes());
    let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: on success the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_LINK_CREATE of `prog` with attach type `attach` on target fd -1: a kernel that can
/// make such a link looks the target up and fails with EBADF; one that cannot fails earlier
/// (EINVAL). Never attaches anything (should a link come back, it is closed at once).
pub fn link_create_probe(prog: BorrowedFd<'_>, attach: u32) -> io::Result<()> {
    let mut attr = Attr([0; 128]);
    attr.0[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr.0[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
    attr.0[8..12].copy_from_slice(&attach.to_ne_bytes());
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: a new fd that nothing else owns; dropping it releases the link.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    Ok(())
}

/// BPF_LINK_UPDATE of link fd -1: EBADF when the kernel knows the command, EINVAL when not.
pub fn link_update_probe() -> io::Result<()> {
    let mut attr = Attr([0; 128]);
    attr.0[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
    attr.0[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// Raises RLIMIT_MEMLOCK to unlimited (what libbpf does on kernels that still charge bpf
/// memory to it). Harmless where the kernel accounts bpf memory to the cgroup instead (5.11+).
pub fn raise_memlock() -> io::Result<()> {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `ioctl(NS_GET_NSTYPE)`: the `CLONE_NEW*` type of a namespace file.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
/// `ioctl(SIOCGSKNS)`: a new fd for the network namespace of a socket.
const SIOCGSKNS: libc::c_ulong = 0x894c;

/// Whether `fd` refers to a network namespace.
pub fn is_netns(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: NS_GET_NSTYPE takes no argument and only returns a value.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
    ret == libc::CLONE_NEWNET
}

/// The network namespace a socket belongs to, as an fd.
pub fn socket_netns(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new fd or -1.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGSKNS as _) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret) })
}

/// `getsockopt(SOL_SOCKET, SO_PROTOCOL)`: the socket's protocol (`IPPROTO_TCP`, ...).
pub fn socket_protocol(sock: BorrowedFd<'_>) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes of the sizes given.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PROTOCOL,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// `pidfd_open(pid, 0)`.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}

/// `pidfd_getfd(pidfd, target_fd, 0)`: a duplicate of another process's fd.
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, target_fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}
