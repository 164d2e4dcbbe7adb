//! `OutputArgs::check` and `OutputPlan::write`: what is rejected before a
//! run, what each name and format produce, and that files appear whole or
//! not at all.
use std::path::Path;

use super::Scratch;
use crate::output::{
    Format, OutputArgs, file,
    plan::{Destination, ImageFormat, Rendering},
};

const HEAP: &[&str] = &[
    "alloc_objects",
    "alloc_space",
    "inuse_objects",
    "inuse_space",
];

fn args(format: Option<Format>, output: Option<&Path>) -> OutputArgs {
    OutputArgs {
        format,
        output: output.map(Path::to_path_buf),
        ..OutputArgs::default()
    }
}

/// The rendering `check` picks, or its error.
fn rendering(format: Option<Format>, name: &str) -> Result<Rendering, String> {
    let dir = Scratch::new(&format!("rendering-{}", name.replace('/', "_")));
    let path = dir.path().join(name);
    let plan = args(format, Some(&path)).check(HEAP);
    assert!(
        dir.entries().is_empty(),
        "check created {:?}",
        dir.entries()
    );
    plan.map(|p| p.rendering).map_err(|e| format!("{e:#}"))
}

#[test]
fn format_from_the_extension() {
    assert_eq!(rendering(None, "a.pb.gz"), Ok(Rendering::Pprof));
    assert_eq!(rendering(None, "a.pb"), Ok(Rendering::Pprof));
    assert_eq!(rendering(None, "a.txt"), Ok(Rendering::Text));
    assert_eq!(rendering(None, "a.folded"), Ok(Rendering::Folded));
    assert_eq!(rendering(None, "a.svg"), Ok(Rendering::Flamegraph));
    assert_eq!(rendering(None, "a.dot"), Ok(Rendering::CallgraphDot));
    assert_eq!(rendering(None, "A.TXT"), Ok(Rendering::Text));
    let plan = OutputArgs::default().check(HEAP).unwrap();
    assert_eq!(plan.rendering, Rendering::Text);
    assert!(plan.to_stdout());
}

/// Images can only be the call graph; they need `dot`, present here (the
/// report tests' setup installs Graphviz).
#[test]
fn image_extensions_mean_the_call_graph() {
    let png = Rendering::CallgraphImage(ImageFormat::Png);
    assert_eq!(rendering(None, "g.png"), Ok(png));
    assert_eq!(
        rendering(None, "g.gif"),
        Ok(Rendering::CallgraphImage(ImageFormat::Gif))
    );
    assert_eq!(rendering(Some(Format::Callgraph), "g.png"), Ok(png));
    assert_eq!(
        rendering(Some(Format::Callgraph), "g.svg"),
        Ok(Rendering::CallgraphImage(ImageFormat::Svg))
    );
    assert_eq!(
        rendering(Some(Format::Callgraph), "g.dot"),
        Ok(Rendering::CallgraphDot)
    );
    assert_eq!(
        rendering(Some(Format::Svg), "g.svg"),
        Ok(Rendering::Flamegraph)
    );
    let err = rendering(Some(Format::Text), "g.png").unwrap_err();
    assert!(err.contains("needs --format callgraph"), "{err}");
}

#[test]
fn unwritable_extensions_are_rejected_before_the_run() {
    let err = rendering(Some(Format::Callgraph), "g.jpg").unwrap_err();
    assert!(
        err.contains("cannot be written as .jpg") && err.contains(".dot, .svg, .png, .gif, .pdf"),
        "{err}"
    );
    let err = rendering(None, "g.jpg").unwrap_err();
    assert!(err.contains("unknown extension .jpg"), "{err}");
    let err = rendering(None, "profile").unwrap_err();
    assert!(err.contains("no extension"), "{err}");
    // With --format, any name holds that format.
    assert_eq!(
        rendering(Some(Format::Pprof), "profile"),
        Ok(Rendering::Pprof)
    );
}

#[test]
fn dot_is_looked_up_in_path() {
    let dir = Scratch::new("dot-in-path");
    let fake = dir.path().join("dot");
    std::fs::write(&fake, "#!/bin/sh\n").unwrap();
    let path = std::env::join_paths([dir.path(), Path::new("/nonexistent")]).unwrap();
    // Not executable: not found.
    assert_eq!(super::super::args::find_program("dot", &path), None);
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(super::super::args::find_program("dot", &path), Some(fake));
    assert_eq!(super::super::args::find_program("dot", "".as_ref()), None);
}

#[test]
fn bad_options_are_one_line_errors_naming_the_flag() {
    let check =
        |a: OutputArgs, types: &[&str]| a.check(types).map(|_| ()).map_err(|e| format!("{e:#}"));
    let focus = OutputArgs {
        focus: Some("(".into()),
        ..OutputArgs::default()
    };
    let err = check(focus, HEAP).unwrap_err();
    assert!(err.starts_with("bad --focus regex `(`"), "{err}");
    assert!(!err.contains('\n'), "{err}");
    let ignore = OutputArgs {
        ignore: Some("[".into()),
        ..OutputArgs::default()
    };
    assert!(check(ignore, HEAP).unwrap_err().contains("--ignore"));
    let cpu = OutputArgs {
        sample_type: Some("cpu".into()),
        ..OutputArgs::default()
    };
    let err = check(cpu.clone(), HEAP).unwrap_err();
    assert!(
        err.contains("--sample-type cpu") && err.contains("alloc_objects, alloc_space"),
        "{err}"
    );
    // Unknown until the profile exists.
    assert_eq!(check(cpu.clone(), &[]), Ok(()));
    assert_eq!(check(cpu, &["samples", "cpu"]), Ok(()));
    let zero = OutputArgs {
        nodecount: Some(0),
        ..OutputArgs::default()
    };
    assert!(check(zero, HEAP).unwrap_err().contains("--nodecount"));
}

#[test]
fn output_directory_must_exist_and_be_writable() {
    let dir = Scratch::new("outdir");
    let missing = dir.path().join("no/such/x.txt");
    let err = format!("{:#}", args(None, Some(&missing)).check(HEAP).unwrap_err());
    assert!(
        err.contains("no directory") && err.contains("no/such"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        args(Some(Format::Text), Some(dir.path()))
            .check(HEAP)
            .unwrap_err()
    );
    assert!(err.contains("is a directory"), "{err}");
    assert!(dir.entries().is_empty());
    // A relative name is in the current directory.
    let plan = args(None, Some(Path::new("x.txt"))).check(HEAP).unwrap();
    assert_eq!(plan.destination, Destination::File("x.txt".into()));
    assert!(!plan.to_stdout());
}

#[test]
fn launch_mode_sends_stdout_reports_to_stderr() {
    let mut plan = OutputArgs::default().check(HEAP).unwrap();
    plan.stdout_to_stderr();
    assert!(!plan.to_stdout());
    assert_eq!(plan.destination, Destination::Stderr);
    // A file stays a file.
    let mut plan = args(None, Some(Path::new("x.txt"))).check(HEAP).unwrap();
    plan.stdout_to_stderr();
    assert_eq!(plan.destination, Destination::File("x.txt".into()));
}

#[test]
fn a_failed_write_leaves_no_file() {
    let dir = Scratch::new("failed-write");
    let target = dir.path().join("out.txt");
    let err = file::write_with(&target, |f| {
        use std::io::Write as _;
        f.write_all(b"half of it")?;
        Err(std::io::Error::other("disk full"))
    })
    .unwrap_err();
    assert!(format!("{err:#}").contains("disk full"));
    assert!(dir.entries().is_empty(), "{:?}", dir.entries());
    // An existing file is kept as it was.
    std::fs::write(&target, "old").unwrap();
    file::write_with(&target, |_| Err(std::io::Error::other("disk full"))).unwrap_err();
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "old");
    assert_eq!(dir.entries(), ["out.txt"]);
}

#[test]
fn a_write_replaces_the_file_whole_and_keeps_its_mode() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = Scratch::new("replace");
    let target = dir.path().join("out.txt");
    std::fs::write(&target, "an older and longer content").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
    file::write(&target, b"new").unwrap();
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
    let mode = std::fs::metadata(&target).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o640);
    // Through a symlink, the file it names is written and the link stays.
    let link = dir.path().join("link.txt");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    file::write(&link, b"via link").unwrap();
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "via link");
    assert_eq!(dir.entries(), ["link.txt", "out.txt"]);
}

#[test]
fn a_fifo_is_written_in_place() {
    use std::os::unix::{ffi::OsStrExt as _, fs::FileTypeExt as _};
    let dir = Scratch::new("fifo");
    let fifo = dir.path().join("pipe");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    // No extension on a FIFO: stdout's default, the text table.
    let plan = args(None, Some(&fifo)).check(HEAP).unwrap();
    assert_eq!(plan.rendering, Rendering::Text);
    file::write(&fifo, b"through the pipe").unwrap();
    assert_eq!(reader.join().unwrap(), b"through the pipe");
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert_eq!(dir.entries(), ["pipe"]);
}

#[test]
fn plan_writes_the_chosen_format() {
    let dir = Scratch::new("plan-write");
    let p = super::writers::profile();
    let out = dir.path().join("p.folded");
    let plan = args(None, Some(&out)).check(&["samples", "cpu"]).unwrap();
    plan.write(&p).unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.starts_with("app-10;main;work;hot 5\n"), "{text}");
    // A sample type the profile lacks fails at write time, leaving no file.
    let out = dir.path().join("q.folded");
    let plan = OutputArgs {
        sample_type: Some("inuse_space".into()),
        ..args(None, Some(&out))
    }
    .check(&[])
    .unwrap();
    let err = format!("{:#}", plan.write(&p).unwrap_err());
    assert!(err.contains("no sample type `inuse_space`"), "{err}");
    assert!(!out.exists());
}

#[test]
fn descriptors_and_devices_are_written_in_place() {
    use crate::output::args::is_special;
    assert!(is_special(Path::new("/dev/stdout")));
    assert!(is_special(Path::new("/dev/fd/1")));
    assert!(is_special(Path::new("/proc/self/fd/1")));
    assert!(is_special(Path::new("/dev/null")));
    // A regular file on a tmpfs under /dev is still replaced whole.
    assert!(!is_special(Path::new("/dev/shm/prof-bpf-no-such-file.txt")));
    let dir = Scratch::new("special");
    assert!(!is_special(&dir.path().join("x.txt")));
}
