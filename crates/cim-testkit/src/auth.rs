//! Decentralized NATS auth (operator mode) for tests, without `nsc`: an operator, its system
//! account, application accounts (with or without JetStream) and users, as NKeys and signed
//! JWTs, plus the server config that trusts them and standard `.creds` files for clients.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use cim_testkit::{NatsServer, Operator, Permissions};
//! let mut op = Operator::new();
//! let app = op.account_with_jetstream("APP"); // create accounts before `.operator(&op)`
//! let server = NatsServer::builder().operator(&op).start().await?;
//! let dir = tempfile::tempdir()?;
//! let creds = app.user("svc", Permissions::all()).write_creds(dir.path())?;
//! let client = app.user("tester", Permissions::all()).connect(&server.url()).await?;
//! # let _ = (creds, client); Ok(()) }
//! ```
//!
//! The server resolves accounts from memory (`resolver: MEMORY` with `resolver_preload`), so
//! every account must exist before the server config is rendered; users need no registration
//! (the account's signature is what the server checks), so they can be made at any time.
//!
//! Claim shapes follow the nats-io/jwt v2 library: header `{"typ":"JWT","alg":"ed25519-nkey"}`,
//! claims `{jti, iat, iss, sub, name, nats: {type, version: 2, ...}}`, the signature an
//! Ed25519 signature by the issuer's NKey over `header.claims`, all base64url without padding.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nkeys::KeyPair;
use serde_json::{Map, Value, json};

use crate::nats::test_connect_options;

/// The name [`Operator::new`] gives the system account.
pub const SYSTEM_ACCOUNT_NAME: &str = "SYS";

const JWT_HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

/// A test operator: signs accounts; the server trusts it (`operator: <jwt>`).
///
/// It always has a system account ([`Operator::system_account`]); add application accounts
/// with [`account_with_jetstream`](Self::account_with_jetstream) or
/// [`account`](Self::account) before rendering the server config.
#[derive(Clone)]
pub struct Operator {
    key: KeyPair,
    name: String,
    jwt: String,
    system: Account,
    accounts: Vec<Account>,
}

impl fmt::Debug for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Operator")
            .field("name", &self.name)
            .field("public_key", &self.public_key())
            .field("system_account", &self.system)
            .field("accounts", &self.accounts)
            .finish()
    }
}

impl Default for Operator {
    fn default() -> Self {
        Self::new()
    }
}

impl Operator {
    /// A fresh operator called `cim-test` with a system account `SYS` (no JetStream).
    pub fn new() -> Self {
        Self::named("cim-test")
    }

    /// A fresh operator with this name and a system account `SYS`.
    pub fn named(name: &str) -> Self {
        let key = KeyPair::new_operator();
        let system = Account::issue(&key, SYSTEM_ACCOUNT_NAME, false);
        let jwt = sign(
            &key,
            claims(
                &key.public_key(),
                &key.public_key(),
                name,
                json!({
                    "type": "operator",
                    "version": 2,
                    "system_account": system.public_key(),
                }),
            ),
        );
        Self { key, name: name.to_owned(), jwt, system, accounts: Vec::new() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `O...`
    pub fn public_key(&self) -> String {
        self.key.public_key()
    }

    /// The operator JWT (self-signed).
    pub fn jwt(&self) -> &str {
        &self.jwt
    }

    /// The system account (`system_account` in the server config).
    pub fn system_account(&self) -> &Account {
        &self.system
    }

    /// The application accounts made so far, oldest first (the system account excluded).
    pub fn accounts(&self) -> &[Account] {
        &self.accounts
    }

    /// A new account with JetStream enabled and no limits (memory, disk, streams, consumers
    /// all unlimited), registered with this operator.
    pub fn account_with_jetstream(&mut self, name: &str) -> Account {
        let account = Account::issue(&self.key, name, true);
        self.accounts.push(account.clone());
        account
    }

    /// A new account without JetStream, registered with this operator.
    pub fn account(&mut self, name: &str) -> Account {
        let account = Account::issue(&self.key, name, false);
        self.accounts.push(account.clone());
        account
    }

    /// nats-server config text for operator mode: `operator`, `system_account`,
    /// `resolver: MEMORY` and `resolver_preload` with the system account and every account
    /// made so far. Accounts made later are not in it.
    pub fn server_config(&self) -> String {
        let mut c = String::from("# operator mode (cim-testkit auth)\n");
        c += &format!("operator: {}\n", quote(&self.jwt));
        c += &format!("system_account: {}\n", quote(&self.system.public_key()));
        c += "resolver: MEMORY\n";
        c += "resolver_preload: {\n";
        for account in std::iter::once(&self.system).chain(&self.accounts) {
            c += &format!("  {}: {}\n", quote(&account.public_key()), quote(&account.jwt));
        }
        c += "}\n";
        c
    }
}

/// An account: signed by its operator, signs its users.
#[derive(Clone)]
pub struct Account {
    key: KeyPair,
    name: String,
    jwt: String,
    jetstream: bool,
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("name", &self.name)
            .field("public_key", &self.public_key())
            .field("jetstream", &self.jetstream)
            .finish()
    }
}

impl Account {
    fn issue(operator: &KeyPair, name: &str, jetstream: bool) -> Self {
        let key = KeyPair::new_account();
        let mut limits = json!({
            "subs": -1,
            "data": -1,
            "payload": -1,
            "imports": -1,
            "exports": -1,
            "wildcards": true,
            "conn": -1,
            "leaf": -1,
        });
        if jetstream {
            let js = json!({
                "mem_storage": -1,
                "disk_storage": -1,
                "streams": -1,
                "consumer": -1,
                "max_ack_pending": -1,
                "mem_max_stream_bytes": -1,
                "disk_max_stream_bytes": -1,
                "max_bytes_required": false,
            });
            if let (Some(l), Some(js)) = (limits.as_object_mut(), js.as_object()) {
                l.extend(js.clone());
            }
        }
        let jwt = sign(
            operator,
            claims(
                &operator.public_key(),
                &key.public_key(),
                name,
                json!({
                    "type": "account",
                    "version": 2,
                    "limits": limits,
                    "default_permissions": { "pub": {}, "sub": {} },
                    "authorization": {},
                }),
            ),
        );
        Self { key, name: name.to_owned(), jwt, jetstream }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `A...`
    pub fn public_key(&self) -> String {
        self.key.public_key()
    }

    /// The account JWT, signed by the operator.
    pub fn jwt(&self) -> &str {
        &self.jwt
    }

    pub fn jetstream(&self) -> bool {
        self.jetstream
    }

    /// A new user of this account with these permissions (and no connection, subscription,
    /// data or payload limits), its JWT signed by the account.
    pub fn user(&self, name: &str, permissions: Permissions) -> User {
        let key = KeyPair::new_user();
        let mut nats = json!({
            "type": "user",
            "version": 2,
            "subs": -1,
            "data": -1,
            "payload": -1,
        });
        if let Some(n) = nats.as_object_mut() {
            n.extend(permissions.to_claims());
        }
        let jwt = sign(&self.key, claims(&self.public_key(), &key.public_key(), name, nats));
        User { key, name: name.to_owned(), account: self.public_key(), jwt }
    }
}

/// Publish and subscribe permissions of a user: allow and deny lists of subjects
/// (wildcards allowed). An empty allow list allows everything not denied;
/// [`Permissions::all`] (the default) allows everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    pub pub_allow: Vec<String>,
    pub pub_deny: Vec<String>,
    pub sub_allow: Vec<String>,
    pub sub_deny: Vec<String>,
    /// `resp: {max: 1}`: may publish one reply to each request received, even to subjects
    /// the publish lists do not allow.
    pub allow_responses: bool,
}

impl Permissions {
    /// No restrictions.
    pub fn all() -> Self {
        Self::default()
    }

    pub fn allow_publish(mut self, subject: impl Into<String>) -> Self {
        self.pub_allow.push(subject.into());
        self
    }

    pub fn deny_publish(mut self, subject: impl Into<String>) -> Self {
        self.pub_deny.push(subject.into());
        self
    }

    pub fn allow_subscribe(mut self, subject: impl Into<String>) -> Self {
        self.sub_allow.push(subject.into());
        self
    }

    pub fn deny_subscribe(mut self, subject: impl Into<String>) -> Self {
        self.sub_deny.push(subject.into());
        self
    }

    pub fn allow_responses(mut self) -> Self {
        self.allow_responses = true;
        self
    }

    /// The `pub`, `sub` (and `resp`) members of the user's `nats` claims.
    fn to_claims(&self) -> Map<String, Value> {
        fn lists(allow: &[String], deny: &[String]) -> Value {
            let mut m = Map::new();
            if !allow.is_empty() {
                m.insert("allow".into(), json!(allow));
            }
            if !deny.is_empty() {
                m.insert("deny".into(), json!(deny));
            }
            Value::Object(m)
        }
        let mut m = Map::new();
        m.insert("pub".into(), lists(&self.pub_allow, &self.pub_deny));
        m.insert("sub".into(), lists(&self.sub_allow, &self.sub_deny));
        if self.allow_responses {
            m.insert("resp".into(), json!({ "max": 1, "ttl": 0 }));
        }
        m
    }
}

/// A user: a JWT signed by its account plus the NKey seed that proves it.
#[derive(Clone)]
pub struct User {
    key: KeyPair,
    name: String,
    account: String,
    jwt: String,
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("public_key", &self.public_key())
            .field("account", &self.account)
            .finish()
    }
}

impl User {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `U...`
    pub fn public_key(&self) -> String {
        self.key.public_key()
    }

    /// The public key of the account that signed this user.
    pub fn account_public_key(&self) -> &str {
        &self.account
    }

    /// The user JWT, signed by the account.
    pub fn jwt(&self) -> &str {
        &self.jwt
    }

    /// The NKey seed (`SU...`).
    pub fn seed(&self) -> String {
        self.key.seed().expect("a generated user key has a seed")
    }

    /// The credentials file text in the standard format (as `nsc` writes it).
    pub fn creds(&self) -> String {
        creds_text(&self.jwt, &self.seed())
    }

    /// Writes [`creds`](Self::creds) to `<dir>/<name>.creds` (mode 0600) and returns the path.
    pub fn write_creds(&self, dir: &Path) -> Result<PathBuf> {
        let file: String = self
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .collect();
        let path = dir.join(format!("{file}.creds"));
        write_private(&path, &self.creds())?;
        Ok(path)
    }

    /// [`test_connect_options`] with this user's credentials.
    pub fn connect_options(&self) -> Result<async_nats::ConnectOptions> {
        test_connect_options()
            .credentials(&self.creds())
            .map_err(|e| anyhow!("using the credentials of user {}: {e}", self.name))
    }

    /// Connects to `url` as this user (fails on an authorization error).
    pub async fn connect(&self, url: &str) -> Result<async_nats::Client> {
        self.connect_options()?.connect(url).await.with_context(|| format!("connecting to {url} as user {}", self.name))
    }
}

/// The standard credentials file text for a user JWT and NKey seed.
pub fn creds_text(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A unique claim id (the server does not check how `jti` is derived).
fn jti() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.write_u32(std::process::id());
    let a = h.finish();
    h.write_u64(a);
    format!("{a:016X}{:016X}", h.finish())
}

fn claims(issuer: &str, subject: &str, name: &str, nats: Value) -> Value {
    json!({
        "jti": jti(),
        "iat": now_secs(),
        "iss": issuer,
        "sub": subject,
        "name": name,
        "nats": nats,
    })
}

/// `base64url(header).base64url(claims).base64url(ed25519 signature)`, no padding.
fn sign(issuer: &KeyPair, claims: Value) -> String {
    let head = URL_SAFE_NO_PAD.encode(JWT_HEADER);
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let input = format!("{head}.{body}");
    let sig = issuer.sign(input.as_bytes()).expect("a generated key has a seed and can sign");
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

/// The claims of a JWT, decoded without checking the signature.
pub fn decode_claims(jwt: &str) -> Result<Value> {
    let body = jwt.split('.').nth(1).ok_or_else(|| anyhow!("not a JWT: {jwt:?}"))?;
    let bytes = URL_SAFE_NO_PAD.decode(body).context("JWT claims are not base64url")?;
    serde_json::from_slice(&bytes).context("JWT claims are not JSON")
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verify(jwt: &str, issuer_public: &str) {
        let (input, sig) = jwt.rsplit_once('.').unwrap();
        let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        KeyPair::from_public_key(issuer_public).unwrap().verify(input.as_bytes(), &sig).unwrap();
        let head = URL_SAFE_NO_PAD.decode(input.split('.').next().unwrap()).unwrap();
        assert_eq!(std::str::from_utf8(&head).unwrap(), JWT_HEADER);
    }

    #[test]
    fn jwts_are_signed_by_their_issuer_and_carry_the_claims() {
        let mut op = Operator::new();
        let app = op.account_with_jetstream("APP");
        let user = app.user("svc", Permissions::all().deny_publish("orders.>").allow_subscribe("_INBOX.>"));
        verify(op.jwt(), &op.public_key());
        verify(op.system_account().jwt(), &op.public_key());
        verify(app.jwt(), &op.public_key());
        verify(user.jwt(), &app.public_key());

        let o = decode_claims(op.jwt()).unwrap();
        assert_eq!(o["nats"]["type"], "operator");
        assert_eq!(o["iss"], o["sub"]);
        let a = decode_claims(app.jwt()).unwrap();
        assert_eq!(a["nats"]["type"], "account");
        assert_eq!(a["nats"]["version"], 2);
        assert_eq!(a["nats"]["limits"]["disk_storage"], -1);
        let s = decode_claims(op.system_account().jwt()).unwrap();
        assert!(s["nats"]["limits"].get("disk_storage").is_none(), "{s}");
        let u = decode_claims(user.jwt()).unwrap();
        assert_eq!(u["iss"], app.public_key());
        assert_eq!(u["sub"], user.public_key());
        assert_eq!(u["nats"]["pub"]["deny"][0], "orders.>");
        assert!(u["nats"]["pub"].get("allow").is_none(), "{u}");
        assert_eq!(u["nats"]["sub"]["allow"][0], "_INBOX.>");
        assert_ne!(a["jti"], u["jti"]);

        let config = op.server_config();
        assert!(config.contains(&format!("system_account: \"{}\"", op.system_account().public_key())));
        assert!(config.contains(&format!("\"{}\": \"{}\"", app.public_key(), app.jwt())));
    }

    #[test]
    fn creds_files_parse_with_async_nats() {
        let mut op = Operator::new();
        let user = op.account("A").user("weird name/1", Permissions::all());
        let dir = tempfile::tempdir().unwrap();
        let path = user.write_creds(dir.path()).unwrap();
        assert_eq!(path.file_name().unwrap(), "weird_name_1.creds");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("-----BEGIN NATS USER JWT-----\n"), "{text}");
        assert!(text.contains(&user.seed()));
        // async-nats' own parser accepts it (it fails on a malformed file).
        async_nats::ConnectOptions::with_credentials(&text).unwrap();
        assert!(async_nats::ConnectOptions::with_credentials("garbage").is_err());
    }

    /// A real nats-server in operator mode accepts the generated JWTs: a user of the
    /// JetStream account can use JetStream, a user the server does not know is refused, and
    /// publish permissions are enforced.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_real_server_trusts_the_operator() -> anyhow::Result<()> {
        use std::time::Duration;

        use futures::StreamExt as _;

        let mut op = Operator::new();
        let app = op.account_with_jetstream("APP");
        let plain = op.account("PLAIN");
        let server = crate::NatsServer::builder().operator(&op).start().await?;

        let admin = app.user("admin", Permissions::all()).connect(&server.url()).await?;
        let js = async_nats::jetstream::new(admin.clone());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        })
        .await?;
        js.publish("orders.1", "x".into()).await?.await?;
        assert_eq!(js.get_stream("ORDERS").await?.info().await?.state.messages, 1);

        // The system account (`$SYS`) answers, so `system_account` was taken.
        let sys = op.system_account().user("sys", Permissions::all()).connect(&server.url()).await?;
        let reply = sys.request("$SYS.REQ.SERVER.PING.VARZ", "".into()).await?;
        let varz: Value = serde_json::from_slice(&reply.payload)?;
        assert_eq!(varz["data"]["system_account"], op.system_account().public_key(), "{varz}");

        // An account without JetStream has none.
        let p = plain.user("p", Permissions::all()).connect(&server.url()).await?;
        assert!(async_nats::jetstream::new(p).query_account().await.is_err());

        // A user of an account the server does not know is refused.
        let stranger = Operator::new().account_with_jetstream("APP").user("x", Permissions::all());
        let err = stranger.connect(&server.url()).await.expect_err("an unknown account's user connected");
        assert!(format!("{err:#}").to_lowercase().contains("authorization"), "{err:#}");

        // Publish permissions are enforced per user.
        let limited = app.user("limited", Permissions::all().deny_publish("secret.>")).connect(&server.url()).await?;
        let mut events = admin.subscribe("secret.x").await?;
        admin.flush().await?;
        limited.publish("secret.x", "no".into()).await?;
        limited.publish("public.x", "yes".into()).await?;
        limited.flush().await?;
        admin.publish("secret.x", "admin".into()).await?;
        admin.flush().await?;
        let m = tokio::time::timeout(Duration::from_secs(5), events.next()).await?.unwrap();
        assert_eq!(&m.payload[..], b"admin", "the denied publish got through");
        Ok(())
    }
}
