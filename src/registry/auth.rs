//! Registry authentication: `WWW-Authenticate` challenges, Bearer tokens
//! (fetched with the credentials when there are any, cached per scope) and
//! Basic auth. Secrets live only in header values marked sensitive and in
//! the token request; `scrub` takes them out of any text shown.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hyper::HeaderMap;
use hyper::header::{self, HeaderValue};
use hyper::{Method, StatusCode};

use super::error::{RegistryError, shown};
use super::http::{self, Request, Transport, Url, is_loopback};
use crate::engine::Credentials;
use crate::fmt::one_line;

/// Largest token answer read (JWTs of some clouds run to several KB).
const MAX_TOKEN_ANSWER: u64 = 1024 * 1024;
/// The distribution spec's default and minimum token lifetime.
const MIN_TOKEN_LIFE: u64 = 60;
/// A token is renewed this long before it expires, so it does not expire in flight.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
    Other(String),
}

/// Every challenge of every `WWW-Authenticate` header, in order.
pub(super) fn challenges(headers: &HeaderMap) -> Vec<Challenge> {
    headers
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(parse_challenges)
        .collect()
}

/// `scheme k=v, k="quoted, value", other-scheme k=v` (RFC 9110 11.6.1).
fn parse_challenges(text: &str) -> Vec<Challenge> {
    let mut raw: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    let token_end = |mut j: usize| {
        while j < b.len() && !matches!(b[j], b' ' | b'\t' | b',' | b'=') {
            j += 1;
        }
        j
    };
    let skip = |mut j: usize, also_commas: bool| {
        while j < b.len() && (b[j] == b' ' || b[j] == b'\t' || (also_commas && b[j] == b',')) {
            j += 1;
        }
        j
    };
    loop {
        i = skip(i, true);
        if i >= b.len() {
            break;
        }
        let end = token_end(i);
        let word = text[i..end].to_owned();
        let after = skip(end, false);
        if after < b.len() && b[after] == b'=' && !raw.is_empty() {
            // A parameter of the current challenge.
            let mut j = skip(after + 1, false);
            let mut value = String::new();
            if j < b.len() && b[j] == b'"' {
                j += 1;
                while j < b.len() && b[j] != b'"' {
                    if b[j] == b'\\' && j + 1 < b.len() {
                        j += 1;
                    }
                    let ch = text[j..].chars().next().unwrap_or_default();
                    value.push(ch);
                    j += ch.len_utf8().max(1);
                }
                j += 1;
            } else {
                let e = token_end(j);
                value.push_str(&text[j..e]);
                j = e;
            }
            if let Some((_, params)) = raw.last_mut() {
                params.push((word.to_ascii_lowercase(), value));
            }
            i = j;
        } else if end == i {
            // A stray `=` or the like: step over it.
            i += 1;
        } else {
            raw.push((word, Vec::new()));
            i = end;
        }
    }
    raw.into_iter()
        .map(|(scheme, params)| {
            let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            match scheme.to_ascii_lowercase().as_str() {
                "bearer" => match get("realm") {
                    Some(realm) => Challenge::Bearer {
                        realm,
                        service: get("service"),
                        scope: get("scope"),
                    },
                    None => Challenge::Other(scheme),
                },
                "basic" => Challenge::Basic,
                _ => Challenge::Other(scheme),
            }
        })
        .collect()
}

struct Token {
    header: HeaderValue,
    renew_at: Instant,
}

/// The credentials of one registry and its tokens.
pub(super) struct Auth {
    /// `Basic base64(user:password)`, when a username and password are known.
    basic: Option<HeaderValue>,
    /// Docker's identity token: an OAuth2 refresh token for the token endpoint.
    identity_token: Option<String>,
    /// Every secret, to take out of messages.
    secrets: Vec<String>,
    /// Bearer tokens by scope (`repository:NAME:pull`).
    tokens: Mutex<HashMap<String, Token>>,
    /// The registry asked for Basic auth: send it up front from now on.
    basic_wanted: AtomicBool,
}

impl Auth {
    pub(super) fn new(credentials: Option<&Credentials>) -> Auth {
        let basic = credentials.and_then(|c| {
            let user = c.username.as_deref()?;
            let pass = c.password.as_deref().unwrap_or_default();
            let encoded =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
            value.set_sensitive(true);
            Some(value)
        });
        let identity_token = credentials.and_then(|c| c.identity_token.clone());
        let secrets = credentials
            .into_iter()
            .flat_map(|c| [c.password.clone(), c.identity_token.clone()])
            .flatten()
            .filter(|s| !s.is_empty())
            .collect();
        Auth {
            basic,
            identity_token,
            secrets,
            tokens: Mutex::new(HashMap::new()),
            basic_wanted: AtomicBool::new(false),
        }
    }

    pub(super) fn has_credentials(&self) -> bool {
        self.basic.is_some() || self.identity_token.is_some()
    }

    /// What to send for `scope` before any challenge: a live token for it,
    /// else Basic once the registry asked for Basic, else nothing.
    pub(super) fn header(&self, scope: &str) -> Option<HeaderValue> {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = tokens.get(scope).filter(|t| Instant::now() < t.renew_at) {
            return Some(t.header.clone());
        }
        drop(tokens);
        self.basic
            .clone()
            .filter(|_| self.basic_wanted.load(Ordering::Relaxed))
    }

    /// `text` without any secret, on one line, cut at 2 KB.
    pub(super) fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in &self.secrets {
            out = out.replace(secret.as_str(), "***");
        }
        one_line(&out)
    }

    /// Acts on a 401's challenges for `scope`: fetches a token (Bearer) or
    /// switches to Basic. `true` when a second try may pass.
    pub(super) async fn answer(
        &self,
        transport: &Transport,
        headers: &HeaderMap,
        scope: &str,
    ) -> Result<bool, RegistryError> {
        let found = challenges(headers);
        let bearer = found.iter().find_map(|c| match c {
            Challenge::Bearer {
                realm,
                service,
                scope: asked,
            } => Some((realm, service, asked)),
            _ => None,
        });
        if let Some((realm, service, asked)) = bearer {
            // The registry's own scope, when it names one, is what its token
            // server expects; the token is kept under ours.
            let asked = asked.as_deref().unwrap_or(scope);
            let token = self
                .fetch_token(transport, realm, service.as_deref(), asked)
                .await?;
            self.tokens
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(scope.to_owned(), token);
            return Ok(true);
        }
        if found.contains(&Challenge::Basic) && self.basic.is_some() {
            return Ok(!self.basic_wanted.swap(true, Ordering::Relaxed));
        }
        Ok(false)
    }

    /// A token from `realm`: with an identity token, the OAuth2 refresh
    /// grant (POST, as Docker does); else GET with Basic credentials when
    /// there are any, anonymous otherwise.
    async fn fetch_token(
        &self,
        transport: &Transport,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<Token, RegistryError> {
        let failed = |why: &str| RegistryError::Token {
            url: shown(realm),
            why: why.to_owned(),
        };
        let realm_url =
            Url::parse(realm).ok_or_else(|| failed("the realm is not an http(s) URL"))?;
        if !realm_url.is_https() && !is_loopback(realm_url.host()) && self.has_credentials() {
            return Err(failed(
                "the realm is plain http on another host; credentials are not sent over it",
            ));
        }
        let mut params = vec![("scope", scope)];
        if let Some(s) = service {
            params.push(("service", s));
        }
        let request = match &self.identity_token {
            Some(refresh) => {
                params.extend([
                    ("grant_type", "refresh_token"),
                    ("client_id", "stowage"),
                    ("refresh_token", refresh.as_str()),
                ]);
                Request {
                    method: Method::POST,
                    url: realm_url,
                    headers: &[],
                    authorization: None,
                    form: Some(http::form_encode(&params)),
                    body: None,
                }
            }
            None => Request {
                method: Method::GET,
                url: realm_url.with_query(&params),
                headers: &[],
                authorization: self.basic.clone(),
                form: None,
                body: None,
            },
        };
        let deadline = tokio::time::Instant::now() + transport.timeout();
        let answer = transport.send(request).await?;
        let status = answer.response.status();
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            let message = self.scrub(&http::error_text(answer.response).await);
            return Err(RegistryError::Unauthorized {
                url: answer.url.to_string(),
                host: answer.url.authority().to_owned(),
                sent_credentials: self.has_credentials(),
                message,
            });
        }
        if !status.is_success() {
            let message = self.scrub(&http::error_text(answer.response).await);
            return Err(RegistryError::Status {
                url: answer.url.to_string(),
                code: status.as_u16(),
                message,
            });
        }
        let body = http::read_bounded(
            &answer.url,
            answer.response,
            MAX_TOKEN_ANSWER,
            deadline,
            transport.timeout(),
        )
        .await?;
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        // serde's message may quote the answer, a token: not shown.
        let parsed: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|_| failed("the answer is not a JSON token object"))?;
        let token = parsed
            .access_token
            .or(parsed.token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| failed("the answer holds no token"))?;
        let mut header = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| failed("the token is not a valid header value"))?;
        header.set_sensitive(true);
        let life = Duration::from_secs(parsed.expires_in.unwrap_or(0).max(MIN_TOKEN_LIFE));
        Ok(Token {
            header,
            renew_at: Instant::now() + life - TOKEN_MARGIN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse_with_quotes_and_several_schemes() {
        let found = parse_challenges(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push", Basic realm="x, y""#,
        );
        assert_eq!(
            found,
            vec![
                Challenge::Bearer {
                    realm: "https://auth.example/token".into(),
                    service: Some("registry.example".into()),
                    scope: Some("repository:a/b:pull,push".into()),
                },
                Challenge::Basic,
            ]
        );
        assert_eq!(
            parse_challenges(r#"basic realm="stowage-test""#),
            vec![Challenge::Basic]
        );
        assert_eq!(
            parse_challenges(r#"Bearer realm=http://127.0.0.1:1/t, error="invalid_token""#),
            vec![Challenge::Bearer {
                realm: "http://127.0.0.1:1/t".into(),
                service: None,
                scope: None,
            }]
        );
        assert_eq!(
            parse_challenges(r#"Bearer service="x""#),
            vec![Challenge::Other("Bearer".into())],
            "a Bearer challenge without a realm is of no use"
        );
        assert_eq!(
            parse_challenges(r#"Negotiate, Bearer realm="a\"b""#)[1],
            Challenge::Bearer {
                realm: "a\"b".into(),
                service: None,
                scope: None
            }
        );
        assert!(parse_challenges("  ,= ").is_empty());
    }

    #[test]
    fn secrets_never_show() {
        let creds = Credentials {
            username: Some("alice".into()),
            password: Some("hunter2".into()),
            identity_token: Some("refresh-me".into()),
            server: "r".into(),
        };
        let auth = Auth::new(Some(&creds));
        assert!(auth.has_credentials());
        assert_eq!(auth.scrub("denied hunter2\n refresh-me"), "denied *** ***");
        // Basic is not sent before the registry asks for it.
        assert_eq!(auth.header("repository:a:pull"), None);
        auth.basic_wanted.store(true, Ordering::Relaxed);
        let basic = auth.header("repository:a:pull").unwrap();
        assert!(basic.is_sensitive());
        assert!(!format!("{basic:?}").contains("aHVudGVy"), "{basic:?}");
        assert!(!Auth::new(None).has_credentials());
    }
}
