//! Object names: what a cache and its origin call a boot file or a disk image.
//!
//! - `files/<path>`: a file under the origin's `server.root`, as clients ask for it over
//!   TFTP (`<path>`) or HTTP (`/files/<path>`);
//! - `images/<name>`: a disk image of the origin's catalog.
//!
//! A name is normalised once, where a request enters, with the same rules as the origin's
//! root confinement (`fleetboot_tftp::path::resolve`): `/` and `\` separate, a leading
//! separator means the top of the tree, `.` and empty parts vanish, `..` and NUL are
//! refused. The origin still confines the path to its root when it opens the file.

/// Longest object name accepted anywhere (bytes).
pub const MAX_NAME: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    #[error("empty file name")]
    Empty,
    #[error("`..` components are refused")]
    Parent,
    #[error("NUL or control character in the name")]
    Control,
    #[error("name longer than {MAX_NAME} bytes")]
    TooLong,
    #[error("not an object name (files/... or images/...)")]
    Kind,
}

/// The normalised `files/...` name of a path a client asked for.
pub fn file_object(requested: &str) -> Result<String, NameError> {
    let mut parts = Vec::new();
    for part in requested.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." => return Err(NameError::Parent),
            p if p.chars().any(char::is_control) => return Err(NameError::Control),
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(NameError::Empty);
    }
    let name = format!("files/{}", parts.join("/"));
    if name.len() > MAX_NAME {
        return Err(NameError::TooLong);
    }
    Ok(name)
}

/// The `images/...` name of a catalog image (`NAME`, as the catalog validates it).
pub fn image_object(image: &str) -> Result<String, NameError> {
    if image.is_empty() {
        return Err(NameError::Empty);
    }
    if image.contains(['/', '\\']) || image == "." || image == ".." {
        return Err(NameError::Parent);
    }
    if image.chars().any(char::is_control) {
        return Err(NameError::Control);
    }
    let name = format!("images/{image}");
    if name.len() > MAX_NAME {
        return Err(NameError::TooLong);
    }
    Ok(name)
}

/// Checks a name received from a peer: it must already be in normal form.
pub fn validate(name: &str) -> Result<(), NameError> {
    if name.len() > MAX_NAME {
        return Err(NameError::TooLong);
    }
    let normal = if let Some(path) = name.strip_prefix("files/") {
        file_object(path)?
    } else if let Some(image) = name.strip_prefix("images/") {
        image_object(image)?
    } else {
        return Err(NameError::Kind);
    };
    if normal == name { Ok(()) } else { Err(NameError::Kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_paths_become_file_objects() {
        assert_eq!(file_object("vmlinuz").unwrap(), "files/vmlinuz");
        assert_eq!(file_object("/grub//grub.cfg").unwrap(), "files/grub/grub.cfg");
        assert_eq!(file_object("boot\\x64\\wdsnbp.com").unwrap(), "files/boot/x64/wdsnbp.com");
        assert_eq!(file_object("./a/./b").unwrap(), "files/a/b");
        assert_eq!(file_object("a/../../etc/passwd"), Err(NameError::Parent));
        assert_eq!(file_object("..\\secret"), Err(NameError::Parent));
        assert_eq!(file_object("a\0b"), Err(NameError::Control));
        assert_eq!(file_object("//"), Err(NameError::Empty));
        assert_eq!(file_object(&"x".repeat(600)), Err(NameError::TooLong));
    }

    #[test]
    fn peer_names_must_be_normal() {
        assert!(validate("files/vmlinuz").is_ok());
        assert!(validate("images/debian").is_ok());
        assert!(validate("files//vmlinuz").is_err());
        assert!(validate("files/../x").is_err());
        assert!(validate("images/a/b").is_err());
        assert!(validate("etc/passwd").is_err());
        assert!(validate("files/").is_err());
    }
}
