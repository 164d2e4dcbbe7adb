use std::{path::PathBuf, time::Duration};

use super::*;

/// A stand-in for the agent's flags, with each kind of argument.
#[derive(Debug, clap::Args, PartialEq)]
struct Flags {
    #[arg(long = "pid", short = 'p')]
    pids: Vec<u32>,
    #[arg(long, conflicts_with = "pids")]
    all: bool,
    #[arg(short = 'F', long, default_value_t = 19)]
    frequency: u64,
    #[arg(long, value_parser = crate::runtime::args::interval)]
    interval: Option<Duration>,
    #[arg(long)]
    no_heap: bool,
    #[arg(long)]
    label: Vec<String>,
    #[arg(long)]
    pyroscope: Vec<String>,
    #[arg(long)]
    config: Option<PathBuf>,
}

/// A config file unique to this test (tests run in parallel).
struct File(PathBuf);

impl File {
    fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "prof-bpf-config-{}-{name}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        Self(path)
    }
    fn args<'a>(&'a self, rest: &[&'a str]) -> CommandLine {
        let mut tokens = vec!["--config", self.0.to_str().unwrap()];
        tokens.extend(rest);
        tokens.into_iter().collect()
    }
}

impl Drop for File {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const FULL: &str = r#"
pid = [11, 12]
frequency = 49
interval = 2.5
no-heap = true
label = ["team=shop", "env=-prod"]
pyroscope = ["http://p:4040"]
"#;

#[test]
fn every_kind_of_key() {
    let file = File::new("full", FULL);
    let flags: Flags = file.args(&[]).parse().unwrap();
    assert_eq!(
        flags,
        Flags {
            pids: vec![11, 12],
            all: false,
            frequency: 49,
            interval: Some(Duration::from_millis(2500)),
            no_heap: true,
            // A value that starts with `-` stays a value.
            label: vec!["team=shop".into(), "env=-prod".into()],
            pyroscope: vec!["http://p:4040".into()],
            config: Some(file.0.clone()),
        }
    );
}

#[test]
fn command_line_overrides_the_file() {
    let file = File::new("override", FULL);
    // A value, a short flag, a repeatable flag (the list is replaced, not
    // extended), and a flag that conflicts with a key.
    let flags: Flags = file
        .args(&[
            "--interval",
            "7",
            "-F",
            "99",
            "--label",
            "team=cli",
            "--all",
            "-v",
        ])
        .parse()
        .unwrap();
    assert_eq!(flags.interval, Some(Duration::from_secs(7)));
    assert_eq!(flags.frequency, 99);
    assert_eq!(flags.label, ["team=cli"]);
    assert!(flags.all);
    assert!(flags.pids.is_empty(), "{flags:?}");
    // Keys the command line does not name still hold.
    assert!(flags.no_heap);
    assert_eq!(flags.pyroscope, ["http://p:4040"]);
    // `--pid` on the command line replaces the file's list.
    let flags: Flags = file.args(&["-p", "5"]).parse().unwrap();
    assert_eq!(flags.pids, [5]);
}

#[test]
fn booleans_false_and_no_file() {
    let file = File::new("false", "no-heap = false\n");
    let flags: Flags = file.args(&[]).parse().unwrap();
    assert!(!flags.no_heap);
    let flags: Flags = ["--no-heap", "--pid=3"]
        .into_iter()
        .collect::<CommandLine>()
        .parse()
        .unwrap();
    assert!(flags.no_heap);
    assert_eq!(flags.pids, [3]);
    assert_eq!(flags.config, None);
}

/// Each bad file gives one line that names the file and the key.
#[test]
fn errors_name_the_file_and_the_key() {
    let cases = [
        ("unknown", "pids = [1]\n", "unknown key `pids`"),
        (
            "bool",
            "no-heap = \"yes\"\n",
            "key `no-heap`: must be a boolean (true or false), not the string \"yes\"",
        ),
        ("list", "label = \"a=b\"\n", "key `label`: must be a list"),
        (
            "table",
            "interval = { a = 1 }\n",
            "key `interval`: must be a string or a number, not a table",
        ),
        ("self", "config = \"other.toml\"\n", "key `config`"),
        // A value clap refuses: its own message, with the flag's name.
        ("range", "interval = 0.001\n", "--interval <INTERVAL>"),
        (
            "number",
            "pid = [\"x\"]\n",
            "invalid value 'x' for '--pid <PIDS>'",
        ),
        // Conflicting keys within the file.
        ("conflict", "pid = [1]\nall = true\n", "cannot be used with"),
        ("syntax", "frequency = 49\ninterval = \n", "line 2: "),
    ];
    for (name, text, want) in cases {
        let file = File::new(name, text);
        let err = format!("{:#}", file.args(&[]).parse::<Flags>().unwrap_err());
        assert!(!err.contains('\n'), "{name}: several lines: {err}");
        assert!(
            err.contains(&file.0.display().to_string()),
            "{name}: no file in: {err}"
        );
        assert!(err.contains(want), "{name}: `{want}` not in: {err}");
    }
    let err = ["--config", "/nonexistent/agent.toml"]
        .into_iter()
        .collect::<CommandLine>()
        .parse::<Flags>()
        .unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        "reading config file /nonexistent/agent.toml: No such file or directory (os error 2)"
    );
}

/// SIGHUP: parsing the same command line again sees the file's new content,
/// and a broken file is an error (the caller keeps its old flags).
#[test]
fn reread_sees_changes() {
    let file = File::new("reread", "frequency = 49\n");
    let args = file.args(&["--label", "a=b"]);
    assert_eq!(args.parse::<Flags>().unwrap().frequency, 49);
    std::fs::write(&file.0, "frequency = 97\nlabel = [\"x=y\"]\n").unwrap();
    let flags = args.parse::<Flags>().unwrap();
    assert_eq!((flags.frequency, flags.label), (97, vec!["a=b".to_owned()]));
    std::fs::write(&file.0, "frequency = -1\n").unwrap();
    assert!(args.parse::<Flags>().is_err());
}

#[test]
fn agent_arguments_of_a_whole_command_line() {
    let argv = ["prof-bpf", "-v", "agent", "--config", "a.toml", "agent"];
    let args = CommandLine::of_agent(argv.into_iter().map(OsString::from));
    assert_eq!(args, ["--config", "a.toml", "agent"].into_iter().collect());
}

#[test]
fn the_packaged_example_is_a_valid_agent_config() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/agent.toml");
    let args: crate::agent::AgentArgs = ["--config", path]
        .into_iter()
        .collect::<CommandLine>()
        .parse()
        .unwrap();
    assert_eq!(args.interval, Some(Duration::from_secs(15)));
    assert_eq!(args.dirs, [PathBuf::from("/var/lib/prof-bpf/profiles")]);
    crate::agent::settings(&args).unwrap();
}

/// Every flag of the agent can be written in a file: each takes a value,
/// a list or a boolean.
#[test]
fn every_agent_flag_has_a_key() {
    let command = agent_command::<crate::agent::AgentArgs>();
    let mut keys = 0;
    for arg in command.get_arguments() {
        let (Some(long), false) = (arg.get_long(), arg.is_hide_set()) else {
            continue;
        };
        if matches!(arg.get_action(), ArgAction::Help | ArgAction::Version) {
            continue;
        }
        let value = match arg.get_action() {
            ArgAction::SetTrue => toml::Value::Boolean(true),
            ArgAction::Append => toml::Value::Array(vec![toml::Value::String("x".into())]),
            _ => toml::Value::String("x".into()),
        };
        assert!(tokens_of(long, &value, arg).is_ok(), "--{long}");
        keys += 1;
    }
    assert!(keys >= 25, "{keys} keys");
}

/// The unwind table options are keys like any flag, checked the same way.
#[test]
fn unwind_options_have_keys() {
    let file = File::new(
        "unwind",
        "dir = [\"/tmp/p\"]\nunwind-memory = 64\nunwind-cache-dir = \"/tmp/uc\"\n",
    );
    let args: crate::agent::AgentArgs = file.args(&[]).parse().unwrap();
    let settings = crate::agent::settings(&args).unwrap();
    assert_eq!(settings.unwind.memory_mib, 64);
    assert_eq!(settings.unwind.cache_dir, Some(PathBuf::from("/tmp/uc")));
    let off = File::new("unwind-off", "dir = [\"/tmp/p\"]\nno-unwind-cache = true\n");
    let args: crate::agent::AgentArgs = off.args(&[]).parse().unwrap();
    assert_eq!(
        crate::agent::settings(&args).unwrap().unwind.cache_dir,
        None
    );
    let bad = File::new("unwind-bad", "dir = [\"/tmp/p\"]\nunwind-memory = 1\n");
    let err = bad
        .args(&[])
        .parse::<crate::agent::AgentArgs>()
        .unwrap_err();
    assert!(format!("{err:#}").contains("unwind-memory"), "{err:#}");
}
