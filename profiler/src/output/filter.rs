//! `--focus` / `--ignore`: which stacks the writers keep.
use regex::Regex;

use crate::profile::{Profile, Sample};

/// Compiled `--focus` / `--ignore` regexes.
#[derive(Clone, Debug, Default)]
pub(crate) struct Filter {
    focus: Option<Regex>,
    ignore: Option<Regex>,
}

impl Filter {
    /// Compiles both regexes; an error names the flag and the pattern.
    pub(crate) fn new(focus: Option<&str>, ignore: Option<&str>) -> anyhow::Result<Self> {
        Ok(Self {
            focus: focus.map(|re| compile("--focus", re)).transpose()?,
            ignore: ignore.map(|re| compile("--ignore", re)).transpose()?,
        })
    }

    /// Whether a stack with these frame names is kept.
    pub(crate) fn keeps(&self, names: &[String]) -> bool {
        let any = |re: &Regex| names.iter().any(|n| re.is_match(n));
        self.focus.as_ref().is_none_or(any) && !self.ignore.as_ref().is_some_and(any)
    }

    /// The profile without the samples the filter drops.
    pub(crate) fn apply(&self, profile: &Profile) -> Profile {
        let mut out = profile.clone();
        if self.focus.is_some() || self.ignore.is_some() {
            out.samples
                .retain(|s| self.keeps(&sample_names(profile, s)));
        }
        out
    }
}

fn compile(flag: &str, re: &str) -> anyhow::Result<Regex> {
    // regex's own message spans several lines (pattern, caret, error); keep
    // the last one.
    Regex::new(re).map_err(|e| {
        let e = e.to_string();
        let why = e.lines().last().unwrap_or("").trim_start_matches("error: ");
        anyhow::anyhow!("bad {flag} regex `{re}`: {why}")
    })
}

/// A sample's frame names, leaf first (innermost inlined frame first).
pub(crate) fn sample_names(profile: &Profile, sample: &Sample) -> Vec<String> {
    sample
        .locations
        .iter()
        .filter_map(|&l| profile.locations.get(l))
        .flat_map(|l| profile.frame_names(l))
        .collect()
}
