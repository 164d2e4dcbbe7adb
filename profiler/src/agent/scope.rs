//! Which processes the agent profiles (`--pid`, `--include`, `--exclude`),
//! and which of them it names: those get malloc uprobes when they do not
//! sample their heap in-process. Pure: the facts of a process are read by
//! the caller ([`Facts::read`]).
use anyhow::bail;

/// One `--include`/`--exclude` pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    /// The executable's path contains this text (its file name included).
    Executable(String),
    /// A line of `/proc/PID/cgroup` contains this text.
    Cgroup(String),
    /// Either.
    Any(String),
}

impl Rule {
    /// `exe:TEXT`, `cgroup:TEXT` or `TEXT`.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let rule = match text.split_once(':') {
            Some(("exe", t)) => Self::Executable(t.to_owned()),
            Some(("cgroup", t)) => Self::Cgroup(t.to_owned()),
            Some((kind, _)) if !kind.contains('/') => bail!(
                "`{text}`: a pattern is exe:TEXT, cgroup:TEXT or TEXT (unknown kind `{kind}`)"
            ),
            _ => Self::Any(text.to_owned()),
        };
        match &rule {
            Self::Executable(t) | Self::Cgroup(t) | Self::Any(t) if t.is_empty() => {
                bail!("`{text}`: empty pattern")
            }
            _ => Ok(rule),
        }
    }

    fn matches(&self, facts: &Facts) -> bool {
        match self {
            Self::Executable(t) => facts.executable.contains(t.as_str()),
            Self::Cgroup(t) => facts.cgroup.contains(t.as_str()),
            Self::Any(t) => {
                facts.executable.contains(t.as_str()) || facts.cgroup.contains(t.as_str())
            }
        }
    }
}

/// What the scope looks at in a process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    pub pid: u32,
    /// Path of the executable (`/proc/PID/exe`), empty when unreadable.
    pub executable: String,
    /// `/proc/PID/cgroup`, as it is.
    pub cgroup: String,
}

impl Facts {
    /// Reads the facts of a running process (empty ones when it is gone).
    pub fn read(pid: u32) -> Self {
        Self {
            pid,
            executable: std::fs::read_link(format!("/proc/{pid}/exe"))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            cgroup: std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default(),
        }
    }
}

/// The processes to profile.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    pids: Vec<u32>,
    /// (include?, rule) in the order given.
    rules: Vec<(bool, Rule)>,
}

impl Scope {
    pub fn new(pids: Vec<u32>, rules: Vec<(bool, Rule)>) -> Self {
        Self { pids, rules }
    }

    /// No --pid and no --include: every process (less the excluded).
    pub fn whole_host(&self) -> bool {
        self.pids.is_empty() && !self.rules.iter().any(|(include, _)| *include)
    }

    /// No --pid and no rule at all: every process, whatever its facts (so
    /// they need not be read).
    pub fn everything(&self) -> bool {
        self.pids.is_empty() && self.rules.is_empty()
    }

    /// Only --pid processes (no --include): the CPU sampler can filter by pid.
    pub fn pids_only(&self) -> bool {
        !self.pids.is_empty() && !self.rules.iter().any(|(include, _)| *include)
    }

    /// The --pid list.
    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    /// Whether the process is profiled: not excluded, and named by --pid or
    /// an --include when there are any.
    pub fn profiles(&self, facts: &Facts) -> bool {
        if self
            .rules
            .iter()
            .any(|(include, rule)| !include && rule.matches(facts))
        {
            return false;
        }
        self.whole_host() || self.named(facts)
    }

    /// Whether the process is named by --pid or an --include (and not
    /// excluded): it may get malloc uprobes.
    pub fn named(&self, facts: &Facts) -> bool {
        let excluded = self
            .rules
            .iter()
            .any(|(include, rule)| !include && rule.matches(facts));
        !excluded
            && (self.pids.contains(&facts.pid)
                || self
                    .rules
                    .iter()
                    .any(|(include, rule)| *include && rule.matches(facts)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(pid: u32, exe: &str, cgroup: &str) -> Facts {
        Facts {
            pid,
            executable: exe.into(),
            cgroup: cgroup.into(),
        }
    }

    #[test]
    fn whole_host_less_the_excluded() {
        let scope = Scope::new(
            vec![],
            vec![(false, Rule::parse("exe:/usr/bin/sshd").unwrap())],
        );
        assert!(scope.whole_host());
        assert!(!scope.everything(), "the exclusion needs the facts");
        assert!(Scope::new(vec![], vec![]).everything());
        assert!(!Scope::new(vec![7], vec![]).everything());
        assert!(scope.profiles(&facts(1, "/usr/bin/app", "0::/")));
        assert!(!scope.profiles(&facts(2, "/usr/bin/sshd", "0::/")));
        assert!(!scope.named(&facts(1, "/usr/bin/app", "0::/")));
    }

    #[test]
    fn includes_and_pids_name_processes() {
        let scope = Scope::new(
            vec![7],
            vec![
                (true, Rule::parse("cgroup:demo.service").unwrap()),
                (false, Rule::parse("exe:bad").unwrap()),
            ],
        );
        assert!(!scope.whole_host());
        let unit = "0::/system.slice/demo.service\n";
        assert!(scope.named(&facts(3, "/srv/app", unit)));
        assert!(scope.named(&facts(7, "/srv/other", "0::/")));
        assert!(!scope.profiles(&facts(8, "/srv/other", "0::/")));
        assert!(!scope.profiles(&facts(3, "/srv/bad", unit)));
    }

    #[test]
    fn patterns_say_what_they_match() {
        assert_eq!(Rule::parse("nginx").unwrap(), Rule::Any("nginx".into()));
        assert_eq!(
            Rule::parse("/opt/a:b").unwrap(),
            Rule::Any("/opt/a:b".into())
        );
        assert!(Rule::parse("exe:").is_err());
        let err = Rule::parse("pod:x").unwrap_err().to_string();
        assert!(err.contains("exe:TEXT"), "{err}");
    }
}
