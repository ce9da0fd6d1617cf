//! Shell-like splitting of rumprun's `cmdline` string into argv.
//!
//! The rules are rumprun's (`rumprun_parseargs`): words are separated by spaces, tabs and
//! newlines; `'...'` and `"..."` quote (both are literal inside, with no expansion); a backslash
//! takes the next character literally, inside quotes too; `""` is an empty word. Unlike
//! rumprun, an unterminated quote is an error instead of running a truncated command.

use crate::{Error, Result};

/// Splits `text` into words.
pub fn split_words(text: &str) -> Result<Vec<String>> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let lit = chars.next().unwrap_or('\\');
                word.get_or_insert_with(String::new).push(lit);
            }
            q @ ('\'' | '"') if quote.is_none() => {
                quote = Some(q);
                word.get_or_insert_with(String::new);
            }
            q if Some(q) == quote => quote = None,
            ' ' | '\t' | '\n' if quote.is_none() => words.extend(word.take()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(quote) = quote {
        return Err(Error::Quote {
            quote,
            text: text.to_owned(),
        });
    }
    words.extend(word);
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Vec<String> {
        split_words(s).unwrap()
    }

    #[test]
    fn splits_like_rumprun() {
        assert_eq!(w("nginx -g 'daemon off;'"), ["nginx", "-g", "daemon off;"]);
        assert_eq!(w("  a\t b\n"), ["a", "b"]);
        assert_eq!(w(""), Vec::<String>::new());
        assert_eq!(w("a \"\" b"), ["a", "", "b"]);
        assert_eq!(w("x=\"1 2\"y"), ["x=1 2y"]);
        assert_eq!(w(r#"a\ b c\"d"#), ["a b", "c\"d"]);
        assert_eq!(w(r#"'it"s' "it's""#), ["it\"s", "it's"]);
        assert_eq!(w(r#""a\"b""#), ["a\"b"]);
        assert_eq!(w("$HOME *"), ["$HOME", "*"]);
        assert_eq!(w("end\\"), ["end\\"]);
    }

    #[test]
    fn unterminated_quotes_are_errors() {
        let e = split_words("sh -c 'echo").unwrap_err();
        assert_eq!(e.to_string(), "unterminated ' quote in \"sh -c 'echo\"");
        assert!(split_words("\"a").is_err());
    }
}
