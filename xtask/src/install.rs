//! `cargo xtask install [--root DIR] [--bin FILE]`: installs the agent as a
//! systemd service under a root directory (default `/`):
//! - `usr/local/bin/prof-bpf`: the release build (built first), or FILE;
//! - `etc/systemd/system/prof-bpf-agent.service`: `packaging/`'s unit;
//! - `etc/prof-bpf/agent.toml`: `packaging/`'s example configuration, only
//!   when there is none yet (an administrator's edits are kept). Mode 0600:
//!   it may hold credentials of the backends.
//!
//! Then, when `systemd-analyze` exists, the installed unit is checked with
//! `systemd-analyze verify --root`. Nothing is started: on a host that runs
//! systemd, `systemctl daemon-reload && systemctl enable --now
//! prof-bpf-agent` does that.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::util;

pub const USAGE: &str = "usage: cargo xtask install [--root DIR] [--bin FILE]";

/// Where each installed file goes, relative to the root.
pub const BINARY: &str = "usr/local/bin/prof-bpf";
pub const UNIT: &str = "etc/systemd/system/prof-bpf-agent.service";
pub const CONFIG: &str = "etc/prof-bpf/agent.toml";

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut root = PathBuf::from("/");
    let mut binary = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value; {USAGE}"))
        };
        match arg.as_str() {
            "--root" => root = PathBuf::from(value()?),
            "--bin" => binary = Some(PathBuf::from(value()?)),
            other => bail!("unknown argument `{other}`; {USAGE}"),
        }
    }
    let binary = match binary {
        Some(b) => b,
        None => {
            crate::setup::run()?;
            util::build_release()?;
            util::release_artifact("prof-bpf")
        }
    };
    let installed = install(&root, &binary, &util::root().join("packaging"))?;
    for (path, what) in &installed {
        println!("xtask: {what} {}", path.display());
    }
    verify_unit(&root)?;
    if root == Path::new("/") {
        println!(
            "xtask: start it with: systemctl daemon-reload && systemctl enable --now prof-bpf-agent"
        );
    }
    Ok(())
}

/// Copies the files under `root`; returns each path with what was done.
pub fn install(
    root: &Path,
    binary: &Path,
    packaging: &Path,
) -> anyhow::Result<Vec<(PathBuf, &'static str)>> {
    if !binary.is_file() {
        bail!(
            "no binary at {} (build it, or name one with --bin)",
            binary.display()
        );
    }
    let mut done = vec![
        (copy(binary, &root.join(BINARY), 0o755)?, "installed"),
        (
            copy(
                &packaging.join("prof-bpf-agent.service"),
                &root.join(UNIT),
                0o644,
            )?,
            "installed",
        ),
    ];
    let config = root.join(CONFIG);
    if config.exists() {
        done.push((config, "kept"));
    } else {
        done.push((
            copy(&packaging.join("agent.toml"), &config, 0o600)?,
            "installed",
        ));
    }
    Ok(done)
}

/// Copies `from` to `to` with `mode`, through a temporary file and a rename:
/// a running binary is replaced, not written over ("text file busy").
fn copy(from: &Path, to: &Path, mode: u32) -> anyhow::Result<PathBuf> {
    let dir = to.parent().context("destination has no parent")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = to.file_name().context("destination has no file name")?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", tmp.display()))?;
    fs::rename(&tmp, to)
        .with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))?;
    Ok(to.to_path_buf())
}

/// `systemd-analyze verify` of the installed unit, when the tool exists.
fn verify_unit(root: &Path) -> anyhow::Result<()> {
    match analyze(&root.join(UNIT), root == Path::new("/")) {
        None => println!("xtask: systemd-analyze not found; the unit was not verified"),
        Some(Ok(())) => println!("xtask: systemd-analyze verify: the unit is valid"),
        Some(Err(problems)) => bail!(
            "systemd-analyze verify {}: {problems}",
            root.join(UNIT).display()
        ),
    }
    Ok(())
}

/// Runs `systemd-analyze verify` on a unit file: None when systemd-analyze
/// is not installed, else its complaints. Its `--root` would look for
/// systemd's own units and /bin/kill under the root too, so the unit is
/// checked against this host; when the binary was installed elsewhere
/// (`host_binary` false), the one complaint that it is missing from
/// /usr/local/bin is expected and dropped.
pub fn analyze(unit: &Path, host_binary: bool) -> Option<Result<(), String>> {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(unit)
        .output()
        .ok()?;
    let missing_binary = format!("Command /{BINARY} is not executable");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| host_binary || !l.contains(&missing_binary))
        .collect();
    // The exit status is 1 for the dropped complaint too: the lines decide.
    Some(if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn installs_into_a_temporary_root() {
        let root = std::env::temp_dir().join(format!("prof-bpf-install-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        // Any executable file stands for the binary (the release build takes
        // minutes); /bin/true so that systemd-analyze finds it executable.
        let binary = Path::new("/bin/true");
        let packaging = util::root().join("packaging");

        let done = install(&root, binary, &packaging).unwrap();
        let names: Vec<_> = done
            .iter()
            .map(|(p, what)| (p.strip_prefix(&root).unwrap().to_path_buf(), *what))
            .collect();
        assert_eq!(
            names,
            [
                (PathBuf::from(BINARY), "installed"),
                (PathBuf::from(UNIT), "installed"),
                (PathBuf::from(CONFIG), "installed"),
            ]
        );
        assert_eq!(
            fs::read(root.join(BINARY)).unwrap(),
            fs::read(binary).unwrap()
        );
        assert_eq!(mode(&root.join(BINARY)), 0o755);
        let unit = fs::read_to_string(root.join(UNIT)).unwrap();
        assert_eq!(
            unit,
            fs::read_to_string(packaging.join("prof-bpf-agent.service")).unwrap()
        );
        assert_eq!(mode(&root.join(UNIT)), 0o644);
        assert_eq!(mode(&root.join(CONFIG)), 0o600);
        assert!(unit.contains(
            "\nExecStart=/usr/local/bin/prof-bpf agent --config /etc/prof-bpf/agent.toml\n"
        ));

        // Again: the binary is replaced, an edited config is kept.
        fs::write(root.join(CONFIG), "interval = 60\n").unwrap();
        let done = install(&root, binary, &packaging).unwrap();
        assert_eq!(done[2].1, "kept");
        assert_eq!(
            fs::read_to_string(root.join(CONFIG)).unwrap(),
            "interval = 60\n"
        );
        assert!(!root.join("usr/local/bin/.prof-bpf.tmp").exists());

        // The unit as systemd reads it (Debian's systemd package has
        // systemd-analyze), and a broken copy fails the check.
        if let Some(verdict) = analyze(&root.join(UNIT), false) {
            assert_eq!(verdict, Ok(()));
            let broken = root.join("etc/systemd/system/broken.service");
            fs::write(
                &broken,
                unit.replace("ProtectHome=read-only", "ProtectHome=bogus"),
            )
            .unwrap();
            let err = analyze(&broken, false).unwrap().unwrap_err();
            assert!(err.contains("bogus"), "{err}");
        } else {
            eprintln!("systemd-analyze not installed: the unit was not verified");
        }

        let err = install(&root, &root.join("missing"), &packaging).unwrap_err();
        assert!(err.to_string().starts_with("no binary at "), "{err}");
        fs::remove_dir_all(&root).unwrap();
    }
}
