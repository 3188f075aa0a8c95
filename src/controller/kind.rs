//! Which of a WorkSpace's two volumes a row, a view or an agent export is about.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

/// Which of a WorkSpace's two volumes; stored and shown as `root` / `user`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeKind {
    /// The root volume, filled from the bundle.
    Root,
    /// The user volume, mounted at /home.
    User,
}

impl VolumeKind {
    /// `root` or `user`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Root => "root",
            Self::User => "user",
        }
    }

    /// Parses `root` / `user`.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "root" => Some(Self::Root),
            "user" => Some(Self::User),
            _ => None,
        }
    }
}

impl std::fmt::Display for VolumeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Stored as the text `root` / `user` (the registry's `kind` columns).
impl ToSql for VolumeKind {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

/// A `kind` column holding anything but `root` / `user` is a corrupt registry, not a user volume.
impl FromSql for VolumeKind {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let text = value.as_str()?;
        Self::parse(text)
            .ok_or_else(|| FromSqlError::Other(format!("unknown volume kind {text:?}").into()))
    }
}

#[cfg(test)]
mod tests {
    use super::VolumeKind;

    #[test]
    fn kinds_round_trip_and_unknown_text_is_refused() {
        for k in [VolumeKind::Root, VolumeKind::User] {
            assert_eq!(VolumeKind::parse(k.as_str()), Some(k));
            assert_eq!(
                serde_json::to_string(&k).expect("serialize"),
                format!("\"{k}\"")
            );
        }
        assert_eq!(VolumeKind::parse("swap"), None);
        let conn = rusqlite::Connection::open_in_memory().expect("sqlite");
        let stored: rusqlite::Result<VolumeKind> =
            conn.query_row("SELECT 'swap'", [], |r| r.get(0));
        assert!(
            stored.is_err(),
            "an unknown kind must not read as a user volume"
        );
    }
}
