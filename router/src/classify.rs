//! SQL statement classifier: decides whether a plain statement may run on a hot standby.
//!
//! Pure and allocation-light: a small lexer that understands comments (nested `/* */` and
//! `--`), standard and `E''` strings, quoted identifiers and dollar quoting, then a few rules
//! per statement. Anything it cannot classify goes to the primary, and a multi-statement string
//! goes to the primary as soon as one of its statements does.

mod lexer;

use serde::Serialize;

use lexer::{Kind, Lexer, Token, Unterminated, ascii_lowercase};

/// Where a statement must run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// Safe on a hot standby.
    Replica,
    /// Writes, locks, changes session state, or could not be classified.
    Primary,
}

/// Why the classifier chose a route (for logs, metrics and the routing table in the docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// SELECT / VALUES / TABLE / read-only WITH without anything that writes.
    ReadOnlyQuery,
    /// SHOW reads a setting.
    Show,
    /// EXPLAIN without ANALYZE only plans; nothing executes.
    ExplainOnly,
    /// COPY ... TO of a read-only source.
    CopyTo,
    /// Only whitespace, comments or empty statements.
    Empty,
    /// INSERT / UPDATE / DELETE / MERGE.
    Dml,
    /// CREATE / ALTER / DROP / TRUNCATE / GRANT / REVOKE / COMMENT ...
    Ddl,
    /// FOR UPDATE / FOR NO KEY UPDATE / FOR SHARE / FOR KEY SHARE.
    LockingClause,
    /// A WITH whose CTEs (or main statement) modify data.
    DataModifyingCte,
    /// A call to nextval/setval, an advisory lock or a configured writing function.
    WritingFunction,
    /// SELECT ... INTO creates a table.
    SelectInto,
    /// SET / RESET / DISCARD / PREPARE ... change the session, which a pool would not keep.
    SessionState,
    /// BEGIN / COMMIT / SAVEPOINT ...: use the typed transaction API instead.
    TransactionControl,
    /// LISTEN / UNLISTEN / NOTIFY are not allowed during recovery.
    Notification,
    /// DECLARE / FETCH / MOVE / CLOSE need a transaction pinned to one connection.
    Cursor,
    /// CALL / DO run arbitrary code.
    Procedure,
    /// LOCK TABLE.
    Lock,
    /// VACUUM / ANALYZE / CLUSTER / REINDEX / REFRESH / CHECKPOINT.
    Maintenance,
    /// COPY ... FROM loads data.
    CopyFrom,
    /// An unterminated quote, comment or dollar-quoted string.
    Unterminated,
    /// A statement kind the classifier does not know.
    Unknown,
}

/// The outcome of classifying one SQL string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Classification {
    pub route: Route,
    pub reason: Reason,
}

impl Classification {
    const fn replica(reason: Reason) -> Self {
        Self {
            route: Route::Replica,
            reason,
        }
    }

    const fn primary(reason: Reason) -> Self {
        Self {
            route: Route::Primary,
            reason,
        }
    }
}

/// Functions that write, take locks, or only work on a primary. Compared case-insensitively
/// with the unqualified function name.
pub const BUILTIN_WRITING_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    "currval",
    "lastval",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "set_config",
    "pg_notify",
    "txid_current",
    "pg_current_xact_id",
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_flush_lsn",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_logical_emit_message",
    "lo_create",
    "lo_creat",
    "lo_import",
    "lo_unlink",
    "lo_put",
    "lo_from_bytea",
    "dblink_exec",
];

/// Classifies SQL strings. Cheap to clone; build once and share.
#[derive(Debug, Clone)]
pub struct Classifier {
    /// Lower-case names of functions whose call sends a statement to the primary.
    writing_functions: Vec<String>,
}

impl Default for Classifier {
    fn default() -> Self {
        Self {
            writing_functions: BUILTIN_WRITING_FUNCTIONS
                .iter()
                .map(|name| (*name).to_owned())
                .collect(),
        }
    }
}

impl Classifier {
    /// The built-in list plus the application's own writing functions (for example a
    /// `create_order(...)` SQL function that inserts).
    pub fn with_writing_functions<I, S>(extra: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut classifier = Self::default();
        classifier.writing_functions.extend(
            extra
                .into_iter()
                .map(|name| name.as_ref().to_ascii_lowercase()),
        );
        classifier
    }

    /// Classify a whole SQL string (which may hold several statements).
    pub fn classify(&self, sql: &str) -> Classification {
        let mut tokens: Vec<Token<'_>> = Vec::with_capacity(32);
        let mut lexer = Lexer::new(sql);
        let mut first_read: Option<Classification> = None;
        loop {
            tokens.clear();
            let mut end_of_input = false;
            loop {
                match lexer.next_token() {
                    Ok(Some(token)) if token.kind == Kind::Punct(b';') => break,
                    Ok(Some(token)) => tokens.push(token),
                    Ok(None) => {
                        end_of_input = true;
                        break;
                    }
                    Err(Unterminated) => return Classification::primary(Reason::Unterminated),
                }
            }
            if !tokens.is_empty() {
                let statement = self.classify_statement(&tokens);
                if statement.route == Route::Primary {
                    return statement;
                }
                first_read.get_or_insert(statement);
            }
            if end_of_input {
                return first_read.unwrap_or(Classification::replica(Reason::Empty));
            }
        }
    }

    fn classify_statement(&self, tokens: &[Token<'_>]) -> Classification {
        // A statement may open with parentheses: `(SELECT 1) UNION (SELECT 2)`.
        let Some(first_word_at) = tokens.iter().position(|t| !t.is_punct(b'(')) else {
            return Classification::replica(Reason::Empty);
        };
        let Kind::Word(first) = tokens[first_word_at].kind else {
            return Classification::primary(Reason::Unknown);
        };
        let keyword = |word: &str| first.eq_ignore_ascii_case(word);

        if keyword("select") || keyword("values") || keyword("table") {
            return self.read_rules(tokens, false, Reason::ReadOnlyQuery);
        }
        if keyword("with") {
            return self.read_rules(tokens, true, Reason::ReadOnlyQuery);
        }
        if keyword("show") {
            return Classification::replica(Reason::Show);
        }
        if keyword("explain") {
            return self.classify_explain(&tokens[first_word_at + 1..]);
        }
        if keyword("copy") {
            let loads = tokens.iter().any(|t| t.depth == 0 && t.is_word("from"));
            if loads {
                return Classification::primary(Reason::CopyFrom);
            }
            return self.read_rules(tokens, true, Reason::CopyTo);
        }
        let mut lower = [0u8; 16];
        let reason = match ascii_lowercase(first, &mut lower) {
            "insert" | "update" | "delete" | "merge" => Reason::Dml,
            "create" | "alter" | "drop" | "truncate" | "grant" | "revoke" | "comment"
            | "security" | "reassign" | "import" => Reason::Ddl,
            "set" | "reset" | "discard" | "prepare" | "execute" | "deallocate" | "load" => {
                Reason::SessionState
            }
            "begin" | "start" | "commit" | "end" | "rollback" | "abort" | "savepoint"
            | "release" => Reason::TransactionControl,
            "listen" | "unlisten" | "notify" => Reason::Notification,
            "declare" | "fetch" | "move" | "close" => Reason::Cursor,
            "call" | "do" => Reason::Procedure,
            "lock" => Reason::Lock,
            "vacuum" | "analyze" | "analyse" | "cluster" | "reindex" | "refresh" | "checkpoint" => {
                Reason::Maintenance
            }
            _ => Reason::Unknown,
        };
        Classification::primary(reason)
    }

    /// EXPLAIN only plans unless ANALYZE executes the statement: then the inner statement decides.
    fn classify_explain(&self, rest: &[Token<'_>]) -> Classification {
        let mut analyze = false;
        let mut inner_from = 0;
        if rest.first().is_some_and(|t| t.is_punct(b'(')) {
            // EXPLAIN (ANALYZE [true|on|1], ...) statement
            let open_depth = rest[0].depth;
            for (index, token) in rest.iter().enumerate().skip(1) {
                if token.is_punct(b')') && token.depth == open_depth {
                    inner_from = index + 1;
                    break;
                }
                if token.is_word("analyze") || token.is_word("analyse") {
                    let disabled = rest
                        .get(index + 1)
                        .is_some_and(|next| next.is_word("false") || next.is_word("off"));
                    analyze |= !disabled;
                }
            }
        } else {
            // Legacy form: EXPLAIN [ANALYZE] [VERBOSE] statement
            for token in rest {
                if token.is_word("analyze") || token.is_word("analyse") {
                    analyze = true;
                } else if !token.is_word("verbose") {
                    break;
                }
                inner_from += 1;
            }
        }
        if !analyze {
            return Classification::replica(Reason::ExplainOnly);
        }
        match rest.get(inner_from..) {
            Some(inner) if !inner.is_empty() => self.classify_statement(inner),
            _ => Classification::primary(Reason::Unknown),
        }
    }

    /// Rules for statements that read: locking clauses, SELECT INTO, writing functions, and
    /// (for WITH and COPY) data-modifying statements anywhere inside.
    fn read_rules(
        &self,
        tokens: &[Token<'_>],
        dml_inside_is_write: bool,
        read_reason: Reason,
    ) -> Classification {
        for (index, token) in tokens.iter().enumerate() {
            match token.kind {
                Kind::Word(word) => {
                    let next = tokens.get(index + 1);
                    if word.eq_ignore_ascii_case("for")
                        && next.is_some_and(|n| {
                            n.is_word("update")
                                || n.is_word("share")
                                || n.is_word("no")
                                || n.is_word("key")
                        })
                    {
                        return Classification::primary(Reason::LockingClause);
                    }
                    if token.depth == 0 && word.eq_ignore_ascii_case("into") {
                        // Only reachable for SELECT/WITH/VALUES/TABLE/COPY: an INSERT INTO inside
                        // WITH is caught below, and `SELECT ... INTO t` creates a table.
                        let insert_before = index > 0 && tokens[index - 1].is_word("insert");
                        if !insert_before {
                            return Classification::primary(Reason::SelectInto);
                        }
                    }
                    if dml_inside_is_write
                        && (word.eq_ignore_ascii_case("insert")
                            || word.eq_ignore_ascii_case("update")
                            || word.eq_ignore_ascii_case("delete")
                            || word.eq_ignore_ascii_case("merge"))
                    {
                        return Classification::primary(Reason::DataModifyingCte);
                    }
                    if next.is_some_and(|n| n.is_punct(b'(')) && self.is_writing_function(word) {
                        return Classification::primary(Reason::WritingFunction);
                    }
                }
                Kind::QuotedIdent(name) => {
                    let next = tokens.get(index + 1);
                    if next.is_some_and(|n| n.is_punct(b'(')) && self.is_writing_function(name) {
                        return Classification::primary(Reason::WritingFunction);
                    }
                }
                _ => {}
            }
        }
        Classification::replica(read_reason)
    }

    fn is_writing_function(&self, name: &str) -> bool {
        self.writing_functions
            .iter()
            .any(|known| known.eq_ignore_ascii_case(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(sql: &str) -> Route {
        Classifier::default().classify(sql).route
    }

    #[test]
    fn plain_select_goes_to_replica() {
        assert_eq!(route("SELECT 1"), Route::Replica);
    }

    #[test]
    fn keywords_hidden_in_literals_do_not_count() {
        assert_eq!(
            route("SELECT 'for update', $$insert$$ FROM t"),
            Route::Replica
        );
        assert_eq!(
            route("SELECT 1 /* for /* nested */ update */"),
            Route::Replica
        );
    }

    #[test]
    fn unterminated_input_goes_to_primary() {
        let classification = Classifier::default().classify("SELECT 'oops");
        assert_eq!(classification.reason, Reason::Unterminated);
        assert_eq!(classification.route, Route::Primary);
    }

    #[test]
    fn configured_writing_function_goes_to_primary() {
        let classifier = Classifier::with_writing_functions(["Create_Order"]);
        assert_eq!(
            classifier.classify("select create_order(1)").route,
            Route::Primary
        );
        assert_eq!(
            Classifier::default()
                .classify("select create_order(1)")
                .route,
            Route::Replica
        );
    }

    #[test]
    fn multibyte_text_outside_quotes_does_not_panic() {
        assert_eq!(route("SELECT 1 « é » FROM t"), Route::Replica);
        assert_eq!(route("SELECT naïve FROM t"), Route::Replica);
    }
}
