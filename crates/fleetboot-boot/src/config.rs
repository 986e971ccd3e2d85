//! The `[[profile]]` and `[[client]]` arrays of fleetboot's config file: boot profiles and
//! the operator's client groups they match on. Profiles deserialize as [`Profile`]s (each
//! checked by [`Profile::validate`], the same rule the HTTP API applies); clients as
//! [`RawClient`]s. [`validate`] names the key as written (`profile[0] (lab).match.arch[0]`).

use crate::identity::MacAddr;
use crate::profile::Profile;
use serde::Deserialize;

/// A key that was refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

/// One `[[client]]` as written: an operator-assigned group for a MAC.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClient {
    mac: MacAddr,
    group: Option<String>,
}

/// The validated profiles and client groups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProfilesConfig {
    /// MAC → group, for `match.group`.
    pub groups: Vec<(MacAddr, String)>,
    pub profiles: Vec<Profile>,
}

impl ProfilesConfig {
    /// The group the operator gave a client.
    pub fn group_of(&self, mac: MacAddr) -> Option<&str> {
        self.groups.iter().find(|(m, _)| *m == mac).map(|(_, g)| g.as_str())
    }
}

/// The key a profile's field is reported under: `profile[3] (name).field`.
pub fn profile_key(i: usize, p: &Profile, field: &str) -> String {
    format!("profile[{i}] ({}).{field}", p.name)
}

pub fn validate(clients: Vec<RawClient>, profiles: Vec<Profile>) -> Result<ProfilesConfig, ConfigError> {
    for (i, p) in profiles.iter().enumerate() {
        if let Err(e) = p.validate() {
            return Err(ConfigError { key: profile_key(i, p, &e.field), problem: e.problem });
        }
        if let Some(j) = profiles[..i].iter().position(|o| o.name == p.name) {
            return Err(ConfigError {
                key: format!("profile[{i}].name"),
                problem: format!("{:?} is defined twice (profile[{j}])", p.name),
            });
        }
    }
    let mut groups: Vec<(MacAddr, String)> = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        if let Some(j) = groups.iter().position(|(m, _)| *m == c.mac) {
            return Err(ConfigError {
                key: format!("client[{i}].mac"),
                problem: format!("{} already has a group (client[{j}])", c.mac),
            });
        }
        if let Some(g) = c.group {
            groups.push((c.mac, g));
        }
    }
    Ok(ProfilesConfig { groups, profiles })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        client: Vec<RawClient>,
        #[serde(default)]
        profile: Vec<Profile>,
    }

    fn parse(text: &str) -> Result<ProfilesConfig, ConfigError> {
        let f: File = toml::from_str(text).unwrap();
        validate(f.client, f.profile)
    }

    const LAB: &str = "[[profile]]\nname = \"lab\"\nboot = { kind = \"boot_file\", path = \"x.efi\" }\n";

    #[test]
    fn groups_and_profiles() {
        let c = parse(&format!("[[client]]\nmac = \"52:54:00:77:00:10\"\ngroup = \"lab\"\n{LAB}")).unwrap();
        assert_eq!(c.group_of("52:54:00:77:00:10".parse().unwrap()), Some("lab"));
        assert_eq!(c.profiles.len(), 1);
    }

    #[test]
    fn errors_name_the_key() {
        let bad_arch = LAB.replace("name = \"lab\"", "name = \"lab\"\nmatch = { arch = [\"sparc\"] }");
        assert_eq!(parse(&bad_arch).unwrap_err().key, "profile[0] (lab).match.arch[0]");
        assert_eq!(parse(&format!("{LAB}{LAB}")).unwrap_err().key, "profile[1].name");
        let twice = "[[client]]\nmac = \"52:54:00:77:00:10\"\ngroup = \"a\"\n";
        assert_eq!(parse(&format!("{twice}{twice}")).unwrap_err().key, "client[1].mac");
    }
}
