//! Package versions and version constraints.
//!
//! A version is dot-separated numbers with an optional `-suffix` (`2.10.1`, `1.0-rc1`):
//! numbers compare numerically, missing trailing numbers count as 0 (`1.2` = `1.2.0`), and
//! a suffix sorts before the same version without one (`1.0-rc1` < `1.0`), as operators of
//! package managers expect. A constraint is comma-separated comparisons that must all hold:
//! `>=1.2, <2`, `=1.4.1`, `^1.2` (same first number, at least 1.2), `*`.

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a {what}: {problem}")]
pub struct ParseError {
    pub text: String,
    pub what: &'static str,
    pub problem: &'static str,
}

#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Version {
    numbers: Vec<u64>,
    suffix: Option<String>,
}

impl Version {
    pub fn new(numbers: &[u64]) -> Version {
        Version { numbers: numbers.to_vec(), suffix: None }
    }

    fn number(&self, i: usize) -> u64 {
        self.numbers.get(i).copied().unwrap_or(0)
    }
}

impl FromStr for Version {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Version, ParseError> {
        let err = |problem| ParseError { text: s.to_string(), what: "version", problem };
        if s.is_empty() || s.len() > 64 {
            return Err(err("want 1 to 64 characters, like 1.2.3"));
        }
        let (nums, suffix) = match s.split_once('-') {
            Some((n, sfx)) => (n, Some(sfx)),
            None => (s, None),
        };
        if let Some(sfx) = suffix {
            if sfx.is_empty() || !sfx.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') {
                return Err(err("the part after '-' must be letters, digits and dots"));
            }
        }
        let mut numbers = Vec::new();
        for part in nums.split('.') {
            if part.is_empty() || !part.chars().all(|c| c.is_ascii_digit()) {
                return Err(err("want dot-separated numbers, like 1.2.3"));
            }
            numbers.push(part.parse().map_err(|_| err("a number is too large"))?);
        }
        if numbers.len() > 8 {
            return Err(err("at most 8 numbers"));
        }
        Ok(Version { numbers, suffix: suffix.map(str::to_string) })
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Version) -> Ordering {
        let n = self.numbers.len().max(other.numbers.len());
        for i in 0..n {
            match self.number(i).cmp(&other.number(i)) {
                Ordering::Equal => {}
                o => return o,
            }
        }
        match (&self.suffix, &other.suffix) {
            (None, None) => Ordering::Equal,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(a), Some(b)) => a.cmp(b),
        }
        // Equal versions written differently (1.2 vs 1.2.0) compare equal; tie-break on
        // the text so Ord stays consistent with Eq.
        .then_with(|| self.numbers.len().cmp(&other.numbers.len()))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Version) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nums: Vec<String> = self.numbers.iter().map(u64::to_string).collect();
        write!(f, "{}", nums.join("."))?;
        if let Some(s) = &self.suffix {
            write!(f, "-{s}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Version, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ge,
    Gt,
    Le,
    Lt,
    Caret,
}

/// A version constraint: every comparison must hold. The empty list (`*`) accepts all.
#[derive(Clone, PartialEq, Eq)]
pub struct Constraint {
    parts: Vec<(Op, Version)>,
}

impl Constraint {
    pub fn any() -> Constraint {
        Constraint { parts: Vec::new() }
    }

    pub fn exactly(v: &Version) -> Constraint {
        Constraint { parts: vec![(Op::Eq, v.clone())] }
    }

    pub fn is_any(&self) -> bool {
        self.parts.is_empty()
    }

    pub fn matches(&self, v: &Version) -> bool {
        self.parts.iter().all(|(op, want)| match op {
            Op::Eq => v.cmp(want) == Ordering::Equal || (v.numbers_eq(want)),
            Op::Ge => v >= want,
            Op::Gt => v > want && !v.numbers_eq(want),
            Op::Le => v <= want || v.numbers_eq(want),
            Op::Lt => v < want && !v.numbers_eq(want),
            Op::Caret => (v >= want || v.numbers_eq(want)) && v.number(0) == want.number(0),
        })
    }
}

impl Version {
    /// Same numbers and suffix, ignoring how many trailing zeros were written.
    fn numbers_eq(&self, other: &Version) -> bool {
        let n = self.numbers.len().max(other.numbers.len());
        (0..n).all(|i| self.number(i) == other.number(i)) && self.suffix == other.suffix
    }
}

impl FromStr for Constraint {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Constraint, ParseError> {
        let err = |problem| ParseError { text: s.to_string(), what: "version constraint", problem };
        let t = s.trim();
        if t.is_empty() || t == "*" {
            return Ok(Constraint::any());
        }
        let mut parts = Vec::new();
        for part in t.split(',') {
            let p = part.trim();
            let (op, rest) = [(">=", Op::Ge), ("<=", Op::Le), ("=", Op::Eq), (">", Op::Gt), ("<", Op::Lt), ("^", Op::Caret)]
                .iter()
                .find_map(|(tok, op)| p.strip_prefix(tok).map(|r| (*op, r)))
                // A bare version means exactly that version.
                .unwrap_or((Op::Eq, p));
            let v: Version = rest.trim().parse().map_err(|_| err("want comparisons like >=1.2, <2 or =1.4.1"))?;
            parts.push((op, v));
        }
        if parts.len() > 8 {
            return Err(err("at most 8 comparisons"));
        }
        Ok(Constraint { parts })
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.parts.is_empty() {
            return write!(f, "*");
        }
        let s: Vec<String> = self
            .parts
            .iter()
            .map(|(op, v)| {
                let tok = match op {
                    Op::Eq => "=",
                    Op::Ge => ">=",
                    Op::Gt => ">",
                    Op::Le => "<=",
                    Op::Lt => "<",
                    Op::Caret => "^",
                };
                format!("{tok}{v}")
            })
            .collect();
        write!(f, "{}", s.join(", "))
    }
}

impl fmt::Debug for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl Serialize for Constraint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Constraint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Constraint, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    #[test]
    fn ordering() {
        assert!(v("1.10") > v("1.9"));
        assert!(v("1.0-rc1") < v("1.0"));
        assert!(v("2") > v("1.99.99"));
        assert_eq!(v("1.2.0").to_string(), "1.2.0");
        assert!("1..2".parse::<Version>().is_err());
        assert!("a.b".parse::<Version>().is_err());
        assert!("1.0-".parse::<Version>().is_err());
    }

    #[test]
    fn constraints() {
        let c: Constraint = ">=1.2, <2".parse().unwrap();
        assert!(c.matches(&v("1.2")) && c.matches(&v("1.9.9")) && !c.matches(&v("2.0")) && !c.matches(&v("1.1")));
        let caret: Constraint = "^1.2".parse().unwrap();
        assert!(caret.matches(&v("1.5")) && !caret.matches(&v("2.0")) && !caret.matches(&v("1.1")));
        assert!("=1.2".parse::<Constraint>().unwrap().matches(&v("1.2.0")));
        assert!("1.2".parse::<Constraint>().unwrap().matches(&v("1.2")));
        assert!("*".parse::<Constraint>().unwrap().matches(&v("0.1")));
        assert!(">=x".parse::<Constraint>().is_err());
        assert_eq!(">=1.2, <2".parse::<Constraint>().unwrap().to_string(), ">=1.2, <2");
    }

    fn version() -> impl Strategy<Value = Version> {
        (proptest::collection::vec(0u64..20, 1..4), proptest::option::of("[a-z]{1,3}"))
            .prop_map(|(numbers, suffix)| Version { numbers, suffix })
    }

    proptest! {
        #[test]
        fn display_parses_back(a in version()) {
            prop_assert_eq!(a.to_string().parse::<Version>().unwrap(), a);
        }

        #[test]
        fn order_is_total_and_consistent(a in version(), b in version(), c in version()) {
            prop_assert_eq!(a.cmp(&b), b.cmp(&a).reverse());
            if a <= b && b <= c { prop_assert!(a <= c); }
            prop_assert_eq!(a == b, a.cmp(&b) == Ordering::Equal);
        }

        #[test]
        fn exact_constraint_matches_only_itself(a in version(), b in version()) {
            let c = Constraint::exactly(&a);
            prop_assert!(c.matches(&a));
            if c.matches(&b) { prop_assert!(a.numbers_eq(&b)); }
        }
    }
}
