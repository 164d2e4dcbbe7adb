//! Hand-made cgroups for the agent's service-name tests: a directory named
//! like a systemd unit in the cgroup v2 hierarchy, or in a v1
//! `name=systemd` hierarchy the test mounts itself.
#![allow(dead_code, reason = "each agent test file uses a part of it")]
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// A cgroup directory made by the test, removed (after its process) on drop.
pub struct Cgroup {
    dir: PathBuf,
    /// The topmost directory made, removed last.
    top: PathBuf,
    /// A hierarchy mounted by the test, unmounted last.
    mount: Option<PathBuf>,
}

impl Cgroup {
    /// Makes `ROOT/prof-bpf-labels-PID-N/system.slice/demo.service`.
    pub fn demo_service(root: &Path, mount: Option<PathBuf>) -> Self {
        // Unique within the test binary too.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let top = root.join(format!("prof-bpf-labels-{}-{n}", std::process::id()));
        let dir = top.join("system.slice/demo.service");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Self { dir, top, mount }
    }

    pub fn enter(&self, pid: u32) {
        move_to(&self.dir, pid);
    }

    /// The cgroup's path in its hierarchy (as `/proc/PID/cgroup` shows it).
    pub fn path(&self) -> String {
        let root = self.top.parent().expect("the top has a parent");
        format!("/{}", self.dir.strip_prefix(root).unwrap().display())
    }
}

pub fn move_to(dir: &Path, pid: u32) {
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string())
        .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", procs.display()));
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Innermost first; a reaped process may leave the cgroup busy for a
        // moment.
        let mut dirs: Vec<PathBuf> = self.dir.ancestors().map(Path::to_path_buf).collect();
        dirs.truncate(
            dirs.iter()
                .position(|d| d == &self.top)
                .map_or(0, |i| i + 1),
        );
        for dir in dirs {
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::remove_dir(&dir).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(mount) = &self.mount {
            let _ = Command::new("umount").arg(mount).status();
            let _ = std::fs::remove_dir(mount);
        }
    }
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on a v2 host,
/// `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_mount() -> PathBuf {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .find_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
        })
        .expect("no cgroup2 hierarchy is mounted")
}

/// Mounts a v1 `name=systemd` hierarchy on a fresh directory: systemd's own
/// on a hybrid host (the same hierarchy, attached once more), or a new one.
/// The returned [`Cgroup`] unmounts it when dropped.
pub fn systemd_v1_demo_service() -> Cgroup {
    let mount = std::env::temp_dir().join(format!("prof-bpf-labels-v1-{}", std::process::id()));
    std::fs::create_dir_all(&mount).unwrap();
    let status = Command::new("mount")
        .args(["-t", "cgroup", "-o", "none,name=systemd", "cgroup"])
        .arg(&mount)
        .status()
        .expect("running mount");
    assert!(
        status.success(),
        "mount -t cgroup -o none,name=systemd failed"
    );
    Cgroup::demo_service(&mount.clone(), Some(mount))
}

impl Cgroup {
    /// Where the hierarchy of this cgroup is mounted, when the test mounted it.
    pub fn mount(&self) -> Option<&Path> {
        self.mount.as_deref()
    }
}
