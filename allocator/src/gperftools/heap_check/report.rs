//! The heap check's verdict: leaks grouped by allocation stack, the leak
//! profile (`$TMPDIR/profalloc.PID.leaks.heap`), rendered by `prof-bpf
//! report` when it can run (raw stacks otherwise), and exit status 1.
use crate::{
    env::{self, PATH_MAX},
    gperftools::{
        arena::Table,
        heap_profile::{Heap, path_str},
        write_file,
    },
    os::Message,
};

/// Objects and bytes of the live table: all, and the unreachable ones.
struct Tally {
    live_objs: u64,
    live_bytes: u64,
    objs: u64,
    bytes: u64,
}

/// Counts the live and the leaked objects, and each bucket's leaks.
fn tally(heap: &mut Heap) -> Tally {
    let mut t = Tally {
        live_objs: 0,
        live_bytes: 0,
        objs: 0,
        bytes: 0,
    };
    for b in heap.buckets.as_mut_slice() {
        b.leak_objects = 0;
        b.leak_bytes = 0;
    }
    for l in heap.live.slots().iter() {
        if l.ptr == 0 {
            continue;
        }
        t.live_objs += 1;
        t.live_bytes += l.size as u64;
        if !l.marked {
            t.objs += 1;
            t.bytes += l.size as u64;
            let b = &mut heap.buckets.as_mut_slice()[l.bucket as usize];
            b.leak_objects += 1;
            b.leak_bytes += l.size as u64;
        }
    }
    t
}

/// The buckets with leaks, largest first.
fn leak_sites(heap: &Heap) -> Table<u32> {
    let mut order: Table<u32> = Table::empty();
    order.reserve(heap.buckets.len().max(1));
    for (i, b) in heap.buckets.as_slice().iter().enumerate() {
        if b.leak_objects > 0 {
            order.push(i as u32);
        }
    }
    // Insertion sort: leak sites are few.
    let bk = heap.buckets.as_slice();
    let o = order.as_mut_slice();
    for i in 1..o.len() {
        let mut j = i;
        while j > 0 && bk[o[j] as usize].leak_bytes > bk[o[j - 1] as usize].leak_bytes {
            o.swap(j, j - 1);
            j -= 1;
        }
    }
    order
}

/// Reports the check on stderr; with leaks, writes the leak profile,
/// renders it, and exits with status 1.
pub(super) fn report(heap: &mut Heap, asked: u32, stopped: u32, overflow: bool) {
    let t = tally(heap);
    if asked > stopped {
        let mut m = Message::new();
        m.str("profalloc: heap check: warning: ")
            .dec(u64::from(asked - stopped))
            .str(" threads did not stop (signals blocked); their stacks were not scanned\n");
        m.write_stderr();
    }
    if overflow {
        Message::new().str("profalloc: heap check: warning: mark stack overflow, some objects may be reported as leaks wrongly\n").write_stderr();
    }
    if t.objs == 0 {
        let mut m = Message::new();
        m.str("profalloc: heap check: no leaks found (")
            .dec(t.live_objs)
            .str(" objects, ")
            .dec(t.live_bytes)
            .str(" bytes still reachable)\n");
        m.write_stderr();
        return;
    }
    let order = leak_sites(heap);
    let mut m = Message::new();
    m.str("profalloc: heap check: found ")
        .dec(t.objs)
        .str(" leaked objects (")
        .dec(t.bytes)
        .str(" bytes) from ")
        .dec(order.len() as u64)
        .str(" allocation stacks; ")
        .dec(t.live_objs - t.objs)
        .str(" objects (")
        .dec(t.live_bytes - t.bytes)
        .str(" bytes) still reachable\n");
    m.write_stderr();

    // The leak profile, in $TMPDIR (default /tmp).
    let mut path = Message::new();
    path.str(env::settings().leak_dir.as_str());
    // SAFETY: getpid has no preconditions.
    path.str("/profalloc.")
        .dec(u64::from(unsafe { libc::getpid() } as u32))
        .str(".leaks.heap");
    let written = match heap.encode(1, "heap check at exit: unreachable objects", true) {
        Some(bytes) => write_file(path_str(&path), bytes),
        None => Err("out of memory"),
    };
    if let Err(e) = written {
        let mut m = Message::new();
        m.str("profalloc: heap check: cannot write the leak profile ")
            .str(path_str(&path))
            .str(": ")
            .str(e)
            .str("\n");
        m.write_stderr();
    }
    let symbolized = written.is_ok() && run_report(path_str(&path));
    if !symbolized {
        print_raw_stacks(heap, &order);
        if written.is_ok() {
            let mut m = Message::new();
            m.str("profalloc: for a symbolized report run: prof-bpf report ")
                .str(path_str(&path))
                .str("\n");
            m.write_stderr();
        }
    }
    let mut m = Message::new();
    m.str("profalloc: heap check: exiting with status 1 because of ")
        .dec(t.objs)
        .str(" leaked objects\n");
    m.write_stderr();
    // SAFETY: flushing stdio and exiting; the other threads stay stopped.
    unsafe {
        libc::fflush(core::ptr::null_mut());
        libc::_exit(1);
    }
}

/// The leak sites' stacks as raw addresses, when no report could run.
fn print_raw_stacks(heap: &Heap, order: &Table<u32>) {
    Message::new()
        .str("profalloc: heap check: prof-bpf report did not run; raw stacks (leaf first):\n")
        .write_stderr();
    for &b in order.as_slice() {
        let b = &heap.buckets.as_slice()[b as usize];
        let mut m = Message::new();
        m.str("Leak of ")
            .dec(b.leak_bytes)
            .str(" bytes in ")
            .dec(b.leak_objects)
            .str(" objects allocated from:\n");
        m.write_stderr();
        for &f in &b.frames[..b.depth as usize] {
            let mut m = Message::new();
            m.str("\t@ ").hex(f).str("\n");
            m.write_stderr();
        }
        if b.truncated {
            Message::new().str("\t[truncated]\n").write_stderr();
        }
    }
}

/// Runs `prof-bpf report FILE` (PROFBPF_PATH, or prof-bpf on PATH) with
/// its output on our stderr. False when it could not run or failed.
fn run_report(file: &str) -> bool {
    let mut prog = [0u8; PATH_MAX + 1];
    let name = env::settings().report_program.as_bytes();
    let n = name.len().min(PATH_MAX);
    prog[..n].copy_from_slice(&name[..n]);
    let mut arg = [0u8; PATH_MAX + 1];
    arg[..file.len().min(PATH_MAX)].copy_from_slice(&file.as_bytes()[..file.len().min(PATH_MAX)]);
    let argv = [
        prog.as_ptr().cast::<libc::c_char>(),
        c"report".as_ptr(),
        arg.as_ptr().cast(),
        core::ptr::null(),
    ];
    let mut m = Message::new();
    m.str("profalloc: heap check: leaks by allocation stack (")
        .str(core::str::from_utf8(&name[..n]).unwrap_or("prof-bpf"))
        .str(" report ")
        .str(file)
        .str("):\n");
    m.write_stderr();
    // The report runs without gperftools mode's settings (it would check itself).
    let mut envp: Table<*const libc::c_char> = Table::empty();
    envp.reserve(1 << 16);
    env::for_each_entry(|entry, text| {
        let ours = [
            &b"LD_PRELOAD="[..],
            b"HEAPCHECK=",
            b"PROFALLOC_HEAPCHECK=",
            b"HEAPPROFILE=",
            b"CPUPROFILE=",
        ];
        if !ours.iter().any(|p| text.starts_with(p)) && envp.len() + 1 < envp.capacity() {
            envp.push(entry);
        }
    });
    envp.push(core::ptr::null());
    // SAFETY: vfork (no fork handlers: stopped threads may hold the
    // allocator's locks), then in the child only dup2/exec/_exit.
    unsafe {
        #[allow(
            deprecated,
            reason = "the child only calls dup2 and execve before leaving"
        )]
        let pid = libc::vfork();
        if pid < 0 {
            return false;
        }
        if pid == 0 {
            libc::dup2(2, 1);
            libc::execvpe(argv[0], argv.as_ptr(), envp.as_slice().as_ptr());
            libc::_exit(127);
        }
        let mut status = 0;
        while libc::waitpid(pid, &mut status, 0) < 0 {
            if *libc::__errno_location() != libc::EINTR {
                return false;
            }
        }
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }
}
