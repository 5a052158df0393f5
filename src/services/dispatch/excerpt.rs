//! What the log line of a refusal shows of the droplet's answer: its start, printable, with
//! any token in it blanked.

use std::time::Duration;

/// Most of a refusing droplet's answer the log line shows.
const ANSWER_EXCERPT_BYTES: usize = 300;

/// The start of a refusal's body (what the droplet says it will not take), read for at most
/// a second and shown as printable text with any token in it blanked (a droplet may echo the
/// bearer it was sent): the operator sees why without the droplet's log.
pub(super) async fn answer_excerpt(mut r: reqwest::Response, sent: &[&str]) -> String {
    let mut bytes = Vec::new();
    let read = async {
        while bytes.len() < ANSWER_EXCERPT_BYTES {
            match r.chunk().await {
                Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), read).await;
    bytes.truncate(ANSWER_EXCERPT_BYTES);
    let text: String = String::from_utf8_lossy(&bytes)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    without_tokens(&text, sent)
}

/// `text` with the credentials sent (`sent`) and anything shaped like a JWT (a run of
/// base64url characters and dots that starts `eyJ`, even cut short) written `[token]`.
fn without_tokens(text: &str, sent: &[&str]) -> String {
    let mut text = text.to_string();
    for secret in sent.iter().filter(|s| !s.is_empty()) {
        text = text.replace(secret, "[token]");
    }
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(start) = rest.find("eyJ") {
        let run_start = rest[..start]
            .char_indices()
            .rev()
            .take_while(|(_, c)| is_token_char(*c))
            .last()
            .map_or(start, |(i, _)| i);
        let end = rest[start..]
            .find(|c: char| !is_token_char(c))
            .map_or(rest.len(), |e| start + e);
        if run_start == start {
            out.push_str(&rest[..start]);
            out.push_str("[token]");
        } else {
            // `eyJ` inside a longer word (`abceyJ...`) is not the start of a token.
            out.push_str(&rest[..end]);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::without_tokens;

    #[test]
    fn tokens_in_a_refusal_are_blanked() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJkcm9wbGV0LTEwIn0.c2lnbmF0dXJl";
        assert_eq!(
            without_tokens(&format!(r#"{{"detail":"bad token {jwt}"}}"#), &[]),
            r#"{"detail":"bad token [token]"}"#
        );
        // Cut short at the excerpt's end, a token is still blanked.
        assert_eq!(
            without_tokens("Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdW", &[]),
            "Bearer [token]"
        );
        // What was sent is blanked whatever its shape; other words stay.
        assert_eq!(
            without_tokens(
                "got opaque-registry-token, keyJar",
                &["opaque-registry-token"]
            ),
            "got [token], keyJar"
        );
        assert_eq!(without_tokens("no tokens here", &[""]), "no tokens here");
        assert_eq!(without_tokens("monkeyJump", &[]), "monkeyJump");
    }
}
