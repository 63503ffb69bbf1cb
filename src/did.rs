//! AT Protocol DID syntax: `did:<method>:<identifier>`, at most 2048 characters.

pub const MAX_LEN: usize = 2048;

/// `^did:[a-z]+:[A-Za-z0-9._:%-]*[A-Za-z0-9._%-]$`, at most [`MAX_LEN`] characters.
pub fn is_valid(s: &str) -> bool {
    if s.len() > MAX_LEN {
        return false;
    }
    let Some(rest) = s.strip_prefix("did:") else {
        return false;
    };
    let Some((method, id)) = rest.split_once(':') else {
        return false;
    };
    let id_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '%' | '-');
    !method.is_empty()
        && method.chars().all(|c| c.is_ascii_lowercase())
        && !id.is_empty()
        && id.chars().all(id_char)
        && !id.ends_with(':')
}

#[cfg(test)]
mod tests {
    use super::is_valid;

    #[test]
    fn accepts_atproto_examples() {
        for ok in [
            "did:plc:ewvi7nxzyoun6zhxrhs64oiz",
            "did:web:example.com",
            "did:web:localhost%3A8080",
            "did:x:a:b",
        ] {
            assert!(is_valid(ok), "{ok}");
        }
    }

    #[test]
    fn rejects_malformed() {
        let long = format!("did:plc:{}", "a".repeat(2041));
        for bad in [
            "",
            "did:",
            "did:plc",
            "did:plc:",
            "did:PLC:abc",
            "did::abc",
            "plc:abc",
            "did:plc:ab c",
            "did:plc:abc:",
            &long,
        ] {
            assert!(!is_valid(bad), "{bad}");
        }
        assert!(is_valid(&long[..2048]));
    }
}
