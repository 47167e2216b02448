//! The application Secret `<name>-app` (CloudNativePG's `<cluster>-app`): the owner role and
//! database of `spec.bootstrap`, their password (generated once by the caller, then read back)
//! and ready connection strings to the read-write Service `<name>-rw`.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

use super::Owner;
use super::names;
use crate::api::BootstrapSpec;

/// How an application reaches the primary: everything the Secret's keys are made of.
#[derive(Clone, PartialEq, Eq)]
pub struct AppConnection {
    pub username: String,
    pub password: String,
    pub dbname: String,
    /// `<name>-rw`, the read-write Service.
    pub host: String,
    /// `<name>-rw.<namespace>`: resolvable from other namespaces too.
    pub qualified_host: String,
    pub port: u16,
}

impl std::fmt::Debug for AppConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppConnection")
            .field("username", &self.username)
            .field("dbname", &self.dbname)
            .field("host", &self.qualified_host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl AppConnection {
    pub fn new(owner: &Owner, bootstrap: &BootstrapSpec, password: &str) -> AppConnection {
        let host = names::rw_service(&owner.name);
        AppConnection {
            username: bootstrap.owner.clone(),
            password: password.to_string(),
            dbname: bootstrap.database.clone(),
            qualified_host: format!("{host}.{}", owner.namespace),
            host,
            port: names::POSTGRES_PORT,
        }
    }

    /// `postgresql://user:password@<name>-rw.<ns>:5432/dbname` (libpq URI, percent-encoded).
    pub fn uri(&self) -> String {
        format!(
            "postgresql://{}:{}@{}:{}/{}",
            percent_encode(&self.username),
            percent_encode(&self.password),
            self.qualified_host,
            self.port,
            percent_encode(&self.dbname)
        )
    }

    /// `jdbc:postgresql://<name>-rw.<ns>:5432/dbname?password=…&user=…`.
    pub fn jdbc_uri(&self) -> String {
        format!(
            "jdbc:postgresql://{}:{}/{}?password={}&user={}",
            self.qualified_host,
            self.port,
            percent_encode(&self.dbname),
            percent_encode(&self.password),
            percent_encode(&self.username)
        )
    }

    /// One `.pgpass` line: `host:port:dbname:username:password`, `:` and `\` escaped.
    pub fn pgpass(&self) -> String {
        let escape = |field: &str| field.replace('\\', "\\\\").replace(':', "\\:");
        format!(
            "{}:{}:{}:{}:{}\n",
            escape(&self.qualified_host),
            self.port,
            escape(&self.dbname),
            escape(&self.username),
            escape(&self.password)
        )
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The Secret `<name>-app`, type `kubernetes.io/basic-auth` (`username`, `password`) with
/// CloudNativePG's other keys.
pub fn app_secret(owner: &Owner, bootstrap: &BootstrapSpec, password: &str) -> Secret {
    let connection = AppConnection::new(owner, bootstrap, password);
    let entry = |key: &str, value: String| (key.to_string(), ByteString(value.into_bytes()));
    Secret {
        metadata: owner.meta(names::app_secret(&owner.name)),
        type_: Some("kubernetes.io/basic-auth".to_string()),
        data: Some(BTreeMap::from([
            entry(names::APP_USERNAME, connection.username.clone()),
            entry(names::APP_PASSWORD, connection.password.clone()),
            entry(names::APP_DBNAME, connection.dbname.clone()),
            entry(names::APP_HOST, connection.host.clone()),
            entry(names::APP_PORT, connection.port.to_string()),
            entry(names::APP_URI, connection.uri()),
            entry(names::APP_JDBC_URI, connection.jdbc_uri()),
            entry(names::APP_PGPASS, connection.pgpass()),
        ])),
        ..Secret::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(password: &str) -> AppConnection {
        AppConnection {
            username: "app".to_string(),
            password: password.to_string(),
            dbname: "shop".to_string(),
            host: "pg-rw".to_string(),
            qualified_host: "pg-rw.db".to_string(),
            port: 5432,
        }
    }

    #[test]
    fn connection_strings_name_the_rw_service() {
        let c = connection("s3cret");
        assert_eq!(c.uri(), "postgresql://app:s3cret@pg-rw.db:5432/shop");
        assert_eq!(
            c.jdbc_uri(),
            "jdbc:postgresql://pg-rw.db:5432/shop?password=s3cret&user=app"
        );
        assert_eq!(c.pgpass(), "pg-rw.db:5432:shop:app:s3cret\n");
    }

    #[test]
    fn special_characters_are_encoded() {
        let c = connection("a:b@c/d\\e%");
        assert_eq!(
            c.uri(),
            "postgresql://app:a%3Ab%40c%2Fd%5Ce%25@pg-rw.db:5432/shop"
        );
        assert!(c.jdbc_uri().contains("password=a%3Ab%40c%2Fd%5Ce%25&"));
        assert_eq!(c.pgpass(), "pg-rw.db:5432:shop:app:a\\:b@c/d\\\\e%\n");
        assert!(!format!("{c:?}").contains("a:b"));
    }
}
