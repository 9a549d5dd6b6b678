//! The system call that makes a child of the master: clone3 (or clone) sharing
//! the master's memory, and its stack, until the child execs, as vfork(2) and
//! posix_spawn(3) do.
//!
//! A copy of the master's memory (fork, or clone without CLONE_VM) costs in
//! proportion to that memory: its page tables copied at each spawn, then a
//! copy-on-write fault for each page the master writes afterwards. The master's
//! memory grows with its workers, so each spawn cost more than the one before;
//! at 4096 workers, copying and faulting were about half of the master's time
//! in a boot (perf: dup_mmap, copy_page_range, do_wp_page). Shared, nothing is
//! copied; CLONE_VFORK holds the master until the child has exec'd or exited,
//! so what the child writes (its frames below the master's stack pointer, its
//! pid into the environment prepared for it, errno) races with nothing.
//!
//! Running the child on the parent's stack takes a few instructions of
//! assembly, written for x86_64; elsewhere the child gets a copy of the memory,
//! as before.

use std::io;

/// The child's entry point: it ends in execve or _exit, never returns.
pub type Entry = unsafe extern "C" fn(*mut libc::c_void) -> !;

/// The flag [`call`] adds to share the master's memory with the child, where
/// it can (0 elsewhere: the child gets a copy).
pub const SHARE_MEMORY: u64 = if cfg!(target_arch = "x86_64") {
    libc::CLONE_VM as u64
} else {
    0
};

/// Make a child with the raw system call `nr` (clone3 or clone) and its
/// arguments `args`; the flags in them must hold CLONE_VFORK, may hold
/// [`SHARE_MEMORY`], and must ask for no stack of the child's own. The child
/// runs `entry(arg)`; this returns in the parent only, with the child's pid.
///
/// # Safety
/// With [`SHARE_MEMORY`], `entry` runs on the parent's stack below its stack
/// pointer and in its memory: it may only make async-signal-safe calls, touch
/// only memory the parent does not use until the child has exec'd, and never
/// return or unwind. `arg` must stay valid until this returns.
#[cfg(target_arch = "x86_64")]
pub unsafe fn call(
    nr: libc::c_long,
    args: [usize; 5],
    entry: Entry,
    arg: *mut libc::c_void,
) -> io::Result<libc::pid_t> {
    let ret: isize;
    // SAFETY: the system call's arguments are the caller's; in the child (rax
    // 0) the code below leaves the parent's frames alone: it steps past the red
    // zone the parent may keep below its stack pointer, aligns the stack for a
    // call and calls `entry`, which never returns. The parent only gets rax.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "sub rsp, 512",
            "and rsp, -16",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") nr as isize => ret,
            in("rdi") args[0],
            in("rsi") args[1],
            in("rdx") args[2],
            in("r10") args[3],
            in("r8") args[4],
            in("r12") arg,
            in("r13") entry,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    if ret < 0 {
        Err(io::Error::from_raw_os_error(-ret as i32))
    } else {
        Ok(ret as libc::pid_t)
    }
}

/// Elsewhere: the libc system call, the child on a copy of the memory.
///
/// # Safety
/// As above; without [`SHARE_MEMORY`] the child's writes stay its own.
#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn call(
    nr: libc::c_long,
    args: [usize; 5],
    entry: Entry,
    arg: *mut libc::c_void,
) -> io::Result<libc::pid_t> {
    // SAFETY: the caller's arguments; the child goes straight into `entry`.
    let ret = unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4]) };
    if ret == 0 {
        // SAFETY: we are the child.
        unsafe { entry(arg) }
    }
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as libc::pid_t)
    }
}
