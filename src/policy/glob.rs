//! Glob patterns, as tag rules (`cache.tag_rules`) and pins (`cache.pins`) write them.

/// Does `pattern` match all of `text`? `*` matches any run of characters (including none and
/// `/`), `?` exactly one; everything else matches itself.
pub fn matches(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and the text position it is currently matched up to.
    let mut star: Option<(usize, usize)> = None;
    while let Some(&tc) = t.get(ti) {
        match p.get(pi) {
            Some(&pc) if pc == '?' || pc == tc => {
                pi += 1;
                ti += 1;
            }
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            _ => {
                let Some((sp, st)) = star else {
                    return false;
                };
                // Let the last `*` swallow one more character and try again.
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            }
        }
    }
    p.iter().skip(pi).all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn globs() {
        assert!(matches("latest", "latest"));
        assert!(!matches("latest", "latest2"));
        assert!(matches("v*", "v1.2.3"));
        assert!(matches("v*", "v"));
        assert!(!matches("v*", "1.2"));
        assert!(matches("*-alpine", "1.25-alpine"));
        assert!(matches("1.?", "1.5"));
        assert!(!matches("1.?", "1.55"));
        assert!(matches("*a*b*", "xxaxxbxx"));
        assert!(!matches("*a*b", "xxbxxa"));
        assert!(matches("*", ""));
    }
}
