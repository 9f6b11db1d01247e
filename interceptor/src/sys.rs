//! The system calls the loader issues itself. This is the crate's only unsafe code.
//!
//! - BPF_LINK_CREATE and BPF_OBJ_PIN: aya 0.14 creates bpf_links for cgroup programs but
//!   cannot hand out the link of a `cgroup/getsockopt` program as a pinnable `FdLink`; doing
//!   the two calls here gives every program one code path (a zeroed, correctly sized
//!   `union bpf_attr`).
//! - pidfd_open / pidfd_getfd: to take a copy of the proxy's inbound listening socket from
//!   its process, so the proxy itself needs no access to bpf.
//! - ioctl NS_GET_NSTYPE and SIOCGSKNS: to check that a path is a network namespace and which
//!   namespace a socket belongs to.
#![allow(unsafe_code)]

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    os::unix::ffi::OsStrExt as _,
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;

/// `enum bpf_attach_type` values of the programs we attach.
#[derive(Clone, Copy, Debug)]
#[repr(u32)]
pub enum AttachType {
    SockOps = 3,
    Inet4Connect = 10,
    Inet6Connect = 11,
    CgroupGetsockopt = 21,
    Inet4Getpeername = 29,
    Inet6Getpeername = 30,
    SkLookup = 36,
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

/// Pins a bpf object (here: a link) at `path` on a bpf filesystem.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut attr = Attr([0; 128]);
    attr.0[0..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    attr.0[8..12].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
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
