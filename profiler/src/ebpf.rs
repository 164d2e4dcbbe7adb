//! Loading the embedded eBPF object and bridging its aya-log output.
use anyhow::{Context as _, bail};
use log::{debug, warn};

/// The object built by build.rs from the `profiler-ebpf` crate.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

/// Fails with an actionable message unless this process may load BPF programs.
pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "must run as root (BPF programs and uprobes need CAP_BPF and CAP_PERFMON): try `sudo prof-bpf ...`"
        );
    }
    Ok(())
}

/// Loads the eBPF object (programs are loaded individually by each session).
pub fn load() -> anyhow::Result<aya::Ebpf> {
    load_with(|_| {})
}

/// [`load`] with loader settings (map sizes, globals) applied by `configure`.
pub fn load_with(configure: impl FnOnce(&mut aya::EbpfLoader<'_>)) -> anyhow::Result<aya::Ebpf> {
    require_root()?;
    if OBJECT.is_empty() {
        bail!(
            "this prof-bpf was built without its eBPF programs (PROF_SKIP_EBPF=1); rebuild with `cargo xtask build`"
        );
    }
    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones use
    // memory cgroups and ignore it, so a failure here is only worth a debug line.
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid, initialised rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        debug!(
            "could not lift RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut loader = aya::EbpfLoader::new();
    configure(&mut loader);
    loader.load(OBJECT).map_err(|err| {
        // aya names the map in the error and again in its source: say it once.
        let root =
            std::error::Error::source(&err).map_or_else(|| err.to_string(), ToString::to_string);
        let too_big = root.contains("os error 7");
        let hint = if too_big {
            ": the kernel refused a map that large (E2BIG); ask for fewer entries"
        } else {
            ""
        };
        anyhow::anyhow!("loading the eBPF object: {root}{hint}")
    })
}

/// Forwards the programs' aya-log records to this process's logger (shown
/// with `-vv`). Must be called inside a tokio runtime.
pub fn spawn_logger(ebpf: &mut aya::Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(err) => {
            // Happens when no loaded program logs anything.
            debug!("eBPF logger not started: {err}");
            return;
        }
    };
    // SAFETY: the logger owns its ring-buffer descriptor for its whole
    // lifetime and always reports the same one.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut logger = match registered {
        Ok(fd) => fd,
        Err(err) => {
            warn!("eBPF logger not started: {err}");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Returns the program `name` of the object as a `T`, loaded into the kernel.
pub fn program<'a, T>(ebpf: &'a mut aya::Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    T: Loadable + 'a,
{
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("eBPF program {name} missing from the object"))?;
    let program: &mut T = program
        .try_into()
        .with_context(|| format!("eBPF program {name} has an unexpected type"))?;
    program
        .load_program()
        .with_context(|| format!("loading eBPF program {name} (rejected by the verifier?)"))?;
    Ok(program)
}

/// Program types whose `load` takes no arguments.
pub trait Loadable {
    /// Loads the program into the kernel.
    fn load_program(&mut self) -> Result<(), aya::programs::ProgramError>;
}

macro_rules! loadable {
    ($($t:ty),*) => {$(
        impl Loadable for $t {
            fn load_program(&mut self) -> Result<(), aya::programs::ProgramError> {
                self.load()
            }
        }
    )*};
}
loadable!(
    aya::programs::UProbe,
    aya::programs::PerfEvent,
    aya::programs::TracePoint
);
