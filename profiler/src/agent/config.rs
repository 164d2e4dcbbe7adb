//! `agent --config FILE`: the agent's flags from a TOML file.
//!
//! Every flag of the agent has a key, its long name without the dashes:
//! ```toml
//! interval = 15            # --interval 15   (a value: a string or a number)
//! no-heap = true           # --no-heap       (a switch: a boolean)
//! pyroscope = ["http://pyroscope:4040"]   # --pyroscope URL, repeatable: a list
//! label = ["team=shop", "env=prod"]
//! ```
//! The file becomes flags placed before the command line's, and clap parses
//! the whole as one command line, so every value is checked exactly as on the
//! command line. A flag given on the command line overrides the file's key
//! (a repeatable one replaces the file's whole list), and so does a flag
//! that conflicts with the key (`--all` on the command line drops the
//! file's `pid`). Unknown keys, values of the wrong type and values clap
//! refuses are one-line errors that name the file and the key.
//!
//! SIGHUP: [`CommandLine::parse`] again re-reads the file. The caller keeps
//! running with its old arguments when that fails, and logs the error.
use std::{
    ffi::{OsStr, OsString},
    path::Path,
};

use anyhow::{Context as _, bail};
use clap::{Arg, ArgAction, ArgMatches, Command, FromArgMatches, parser::ValueSource};

/// The id (and long name) of the flag that names the file.
pub const CONFIG: &str = "config";

/// The agent's own command line (the arguments after `agent`), kept so that
/// the file can be read again on SIGHUP with the same overrides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandLine {
    tokens: Vec<OsString>,
}

impl CommandLine {
    pub fn new(tokens: Vec<OsString>) -> Self {
        Self { tokens }
    }

    /// The arguments after the `agent` subcommand of a whole command line
    /// (program name first). Global options before a subcommand take no
    /// value (`-v`), so the first `agent` after the program name is it.
    pub fn of_agent(argv: impl IntoIterator<Item = OsString>) -> Self {
        let tokens = argv
            .into_iter()
            .skip(1)
            .skip_while(|t| t != "agent")
            .skip(1)
            .collect();
        Self { tokens }
    }

    /// Parses the command line, merged with the file its `--config` names
    /// (if any).
    pub fn parse<A: clap::Args + FromArgMatches>(&self) -> anyhow::Result<A> {
        let command = agent_command::<A>();
        let given = command
            .clone()
            .try_get_matches_from(&self.tokens)
            .map_err(|e| anyhow::anyhow!("{}", one_line(&e)))?;
        let Some(path) = given.get_raw(CONFIG).and_then(|mut v| v.next()) else {
            return from_matches(&given);
        };
        let path = Path::new(path);
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let file = flags_of_file(&text, &command)
            .with_context(|| format!("config file {}", path.display()))?;
        let mut tokens: Vec<OsString> = file
            .into_iter()
            .filter(|flag| !overridden(&command, &given, flag.id))
            .flat_map(|flag| flag.tokens)
            .collect();
        tokens.extend(self.tokens.iter().cloned());
        let merged = command
            .try_get_matches_from(&tokens)
            .map_err(|e| anyhow::anyhow!("config file {}: {}", path.display(), one_line(&e)))?;
        from_matches(&merged)
    }
}

/// The agent's arguments as a command of their own. `-v` is the binary's
/// global flag, which may also follow `agent`: accepted and ignored here.
fn agent_command<A: clap::Args>() -> Command {
    let command = A::augment_args(Command::new("agent")).no_binary_name(true);
    if command.get_arguments().any(|a| a.get_id() == "verbose") {
        return command;
    }
    command.arg(
        Arg::new("verbose")
            .short('v')
            .long("verbose")
            .action(ArgAction::Count)
            .hide(true),
    )
}

fn from_matches<A: FromArgMatches>(matches: &ArgMatches) -> anyhow::Result<A> {
    A::from_arg_matches(matches).map_err(|e| anyhow::anyhow!("{}", one_line(&e)))
}

/// One key of the file as the flags it stands for.
#[derive(Debug, PartialEq, Eq)]
struct FileFlag<'a> {
    /// The clap id of the flag's argument.
    id: &'a str,
    tokens: Vec<OsString>,
}

/// Whether the command line sets the flag, or one that conflicts with it.
fn overridden(command: &Command, given: &ArgMatches, id: &str) -> bool {
    let on_command_line = |id: &str| given.value_source(id) == Some(ValueSource::CommandLine);
    if on_command_line(id) {
        return true;
    }
    let Some(arg) = command.get_arguments().find(|a| a.get_id() == id) else {
        return false;
    };
    let conflicts_with_given = command
        .get_arg_conflicts_with(arg)
        .iter()
        .any(|other| on_command_line(other.get_id().as_str()));
    let given_conflicts_with_it = command
        .get_arguments()
        .filter(|other| on_command_line(other.get_id().as_str()))
        .any(|other| {
            command
                .get_arg_conflicts_with(other)
                .iter()
                .any(|c| c.get_id() == id)
        });
    conflicts_with_given || given_conflicts_with_it
}

/// The file's keys as flags, in the file's order. The file alone must also
/// be a valid command line.
fn flags_of_file<'c>(text: &str, command: &'c Command) -> anyhow::Result<Vec<FileFlag<'c>>> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map_or(0, |s| text[..s.start].matches('\n').count() + 1);
        anyhow::anyhow!("line {line}: {}", e.message().trim_end())
    })?;
    let mut flags = Vec::new();
    for (key, value) in &table {
        let arg = command
            .get_arguments()
            // Not the `-v` that agent_command adds (it would do nothing).
            .filter(|a| !(a.is_hide_set() && a.get_id() == "verbose"))
            .find(|a| a.get_long() == Some(key))
            .with_context(|| {
                format!("unknown key `{key}` (keys are the long names of the agent's flags)")
            })?;
        if key == CONFIG {
            bail!("key `{CONFIG}`: a config file cannot name another one");
        }
        let tokens = tokens_of(key, value, arg).with_context(|| format!("key `{key}`"))?;
        flags.push(FileFlag {
            id: arg.get_id().as_str(),
            tokens,
        });
    }
    let alone: Vec<&OsString> = flags.iter().flat_map(|f| &f.tokens).collect();
    if let Err(e) = command.clone().try_get_matches_from(alone) {
        bail!("{}", one_line(&e));
    }
    Ok(flags)
}

/// The command-line tokens of one key: `--key=VALUE` for a value (one token,
/// so a value that starts with `-` stays a value), `--key` for a switch.
fn tokens_of(key: &str, value: &toml::Value, arg: &Arg) -> anyhow::Result<Vec<OsString>> {
    let flag = || OsString::from(format!("--{key}"));
    let with_value = |v: &toml::Value| scalar(v).map(|v| OsString::from(format!("--{key}={v}")));
    match arg.get_action() {
        ArgAction::SetTrue | ArgAction::SetFalse => match value {
            toml::Value::Boolean(true) => Ok(vec![flag()]),
            toml::Value::Boolean(false) => Ok(Vec::new()),
            other => bail!("must be a boolean (true or false), not {}", describe(other)),
        },
        ArgAction::Count => match value {
            toml::Value::Integer(n @ 0..=255) => Ok(vec![flag(); *n as usize]),
            other => bail!("must be a count from 0 to 255, not {}", describe(other)),
        },
        ArgAction::Append => match value {
            toml::Value::Array(items) => items.iter().map(with_value).collect(),
            other => bail!(
                "must be a list (the flag may be given several times), not {}",
                describe(other)
            ),
        },
        ArgAction::Set => Ok(vec![with_value(value)?]),
        // Help and version are not settings.
        _ => bail!("is not a setting"),
    }
}

/// A value as it would be written on the command line.
fn scalar(value: &toml::Value) -> anyhow::Result<String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(n) => Ok(n.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        other => bail!("must be a string or a number, not {}", describe(other)),
    }
}

fn describe(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => format!("the string \"{s}\""),
        toml::Value::Array(_) => "a list".to_owned(),
        toml::Value::Table(_) => "a table".to_owned(),
        toml::Value::Integer(n) => format!("the integer {n}"),
        toml::Value::Float(f) => format!("the float {f}"),
        toml::Value::Boolean(b) => format!("the boolean {b}"),
        toml::Value::Datetime(d) => format!("the date {d}"),
    }
}

/// clap's message on one line (it runs until the usage block), without the
/// leading `error: `.
fn one_line(err: &clap::Error) -> String {
    let text = err.render().to_string();
    let message: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    let message = message.join(" ");
    message
        .strip_prefix("error: ")
        .unwrap_or(&message)
        .to_owned()
}

/// Convenience for tests and callers holding plain strings.
impl<S: AsRef<OsStr>> FromIterator<S> for CommandLine {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        Self::new(iter.into_iter().map(|s| s.as_ref().to_owned()).collect())
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
