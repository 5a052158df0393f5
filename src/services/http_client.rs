//! Outbound HTTP clients are built here: a client that cannot be built is an error naming it,
//! never a default client (which would follow redirects, with no timeouts and no address
//! policy).

/// An outbound HTTP client that could not be built, and which one.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client for {what}: {reason}")]
pub struct ClientBuildError {
    what: &'static str,
    reason: String,
}

/// Builds a client, or says which one failed and why (the error's whole chain: reqwest's own
/// text is only "builder error").
pub fn build_client(
    what: &'static str,
    builder: reqwest::ClientBuilder,
) -> Result<reqwest::Client, ClientBuildError> {
    builder.build().map_err(|e| {
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            reason.push_str(": ");
            reason.push_str(&cause.to_string());
            source = cause.source();
        }
        ClientBuildError { what, reason }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_that_cannot_be_built_is_an_error_naming_it_not_a_default_client() {
        // No TLS version left (rustls offers 1.2 and 1.3): reqwest's builder fails.
        let failing = reqwest::Client::builder()
            .min_tls_version(reqwest::tls::Version::TLS_1_3)
            .max_tls_version(reqwest::tls::Version::TLS_1_2);
        let err = build_client("Registry requests", failing).expect_err("must fail");
        let text = err.to_string();
        assert!(
            text.starts_with("cannot build the HTTP client for Registry requests: builder error"),
            "{text}"
        );
        assert!(text.contains("empty supported tls versions"), "{text}");
        assert!(build_client("deliveries", reqwest::Client::builder()).is_ok());
    }
}
