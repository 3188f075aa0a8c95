//! Unit tests of the registry: rows round-trip through SQLite.

use super::*;

#[test]
fn round_trips_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Registry::open(dir.path()).expect("open");
    assert!(r.add_directory("d-1234567890").expect("add"));
    assert!(!r.add_directory("d-1234567890").expect("add again"));
    assert!(r.has_directory("d-1234567890").expect("has"));
    let u = User {
        directory_id: "d-1234567890".into(),
        user_name: "bob".into(),
        sid: "S-1-5-21-1-2-3-1001".into(),
    };
    r.add_user(&u).expect("user");
    let again = r
        .add_user(&User {
            sid: "other".into(),
            ..u.clone()
        })
        .expect("user again");
    assert_eq!(again.sid, u.sid, "existing user keeps its SID");
    let w = Workspace {
        workspace_id: "ws-abc".into(),
        directory_id: u.directory_id.clone(),
        user_name: "bob".into(),
        bundle_id: "wsb-1".into(),
        state: WorkspaceState::Pending,
        key_arn: Some("arn:k".into()),
        root_encrypted: true,
        user_encrypted: false,
        root_size_gib: 10,
        user_size_gib: 10,
        ws_grant_id: Some("g".into()),
        error: None,
        cache_mode: crate::backing::CacheMode::None,
    };
    r.insert_workspace(&w).expect("insert");
    r.set_state("ws-abc", WorkspaceState::Available, None)
        .expect("state");
    let got = r.workspace("ws-abc").expect("get").expect("present");
    assert_eq!(got.state, WorkspaceState::Available);
    assert!(got.root_encrypted && !got.user_encrypted);
    assert_eq!(got.cache_mode, crate::backing::CacheMode::None);
    drop(r);
    // Durable across reopen.
    let r = Registry::open(dir.path()).expect("reopen");
    assert_eq!(r.workspaces().expect("list").len(), 1);
}

fn workspace(id: &str, key: Option<&str>, grant: Option<&str>, error: Option<&str>) -> Workspace {
    Workspace {
        workspace_id: id.into(),
        directory_id: "d-1234567890".into(),
        user_name: "bob".into(),
        bundle_id: "wsb-1".into(),
        state: WorkspaceState::Pending,
        key_arn: key.map(str::to_string),
        root_encrypted: key.is_some(),
        user_encrypted: false,
        root_size_gib: 10,
        user_size_gib: 10,
        ws_grant_id: grant.map(str::to_string),
        error: error.map(str::to_string),
        cache_mode: crate::backing::CacheMode::Writeback,
    }
}

fn volume(id: &str, key: Option<&str>, grant: Option<&str>) -> Volume {
    Volume {
        volume_id: id.into(),
        workspace_id: "ws-opt".into(),
        kind: VolumeKind::Root,
        path: PathBuf::from(format!("/v/{id}")),
        encrypted: key.is_some(),
        key_arn: key.map(str::to_string),
        grant_id: grant.map(str::to_string),
        size_gib: 10,
        formatted: false,
    }
}

#[test]
fn optional_fields_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Registry::open(dir.path()).expect("open");
    r.insert_workspace(&workspace("ws-none", None, None, None))
        .expect("insert none");
    r.insert_workspace(&workspace(
        "ws-some",
        Some("arn:k"),
        Some("g-1"),
        Some("boom"),
    ))
    .expect("insert some");
    let none = r.workspace("ws-none").expect("get").expect("present");
    assert_eq!(
        (none.key_arn, none.ws_grant_id, none.error),
        (None, None, None)
    );
    let mut some = r.workspace("ws-some").expect("get").expect("present");
    assert_eq!(some.key_arn.as_deref(), Some("arn:k"));
    assert_eq!(some.ws_grant_id.as_deref(), Some("g-1"));
    assert_eq!(some.error.as_deref(), Some("boom"));

    // update_workspace and set_state write None and Some too.
    some.error = None;
    some.ws_grant_id = None;
    r.update_workspace(&some).expect("update");
    let got = r.workspace("ws-some").expect("get").expect("present");
    assert_eq!((got.ws_grant_id, got.error), (None, None));
    assert_eq!(got.key_arn.as_deref(), Some("arn:k"));
    r.set_state("ws-some", WorkspaceState::Error, Some("bad"))
        .expect("state");
    let got = r.workspace("ws-some").expect("get").expect("present");
    assert_eq!(got.error.as_deref(), Some("bad"));
    r.set_state("ws-some", WorkspaceState::Error, None)
        .expect("state");
    let got = r.workspace("ws-some").expect("get").expect("present");
    assert_eq!(got.error, None);

    r.put_volume(&volume("vol-none", None, None))
        .expect("put none");
    r.put_volume(&volume("vol-some", Some("arn:k"), Some("g-2")))
        .expect("put some");
    let vols = r.volumes(Some("ws-opt")).expect("volumes");
    let find = |id: &str| vols.iter().find(|v| v.volume_id == id).expect("volume row");
    let none = find("vol-none");
    assert_eq!(
        (none.key_arn.as_deref(), none.grant_id.as_deref()),
        (None, None)
    );
    let some = find("vol-some");
    assert_eq!(
        (some.key_arn.as_deref(), some.grant_id.as_deref()),
        (Some("arn:k"), Some("g-2"))
    );

    // The columns keep their on-disk form: "" stands for none.
    let raw: (String, String, String) = r
        .conn
        .query_row(
            "SELECT key_arn, ws_grant_id, error FROM workspaces WHERE workspace_id = 'ws-none'",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .expect("raw row");
    assert_eq!(raw, (String::new(), String::new(), String::new()));
}

#[test]
fn a_database_from_before_cache_modes_gains_the_column_as_writeback() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        // The workspaces table as sealvol created it before cache modes existed.
        let conn = rusqlite::Connection::open(dir.path().join("controller.db")).expect("open");
        conn.execute_batch(
            "CREATE TABLE workspaces (workspace_id TEXT PRIMARY KEY, directory_id TEXT NOT NULL,
             user_name TEXT NOT NULL, bundle_id TEXT NOT NULL, state TEXT NOT NULL, key_arn TEXT NOT NULL,
             root_encrypted INTEGER NOT NULL, user_encrypted INTEGER NOT NULL, root_size_gib INTEGER NOT NULL,
             user_size_gib INTEGER NOT NULL, ws_grant_id TEXT NOT NULL, error TEXT NOT NULL DEFAULT '',
             created INTEGER NOT NULL);
             INSERT INTO workspaces VALUES ('ws-old', 'd-1', 'bob', 'wsb-1', 'AVAILABLE', '', 0, 0, 10, 10, '', '', 1);",
        )
        .expect("old schema");
    }
    let r = Registry::open(dir.path()).expect("open migrates");
    let old = r.workspace("ws-old").expect("read").expect("present");
    assert_eq!(old.cache_mode, crate::backing::CacheMode::Writeback);
    let mut changed = old.clone();
    changed.cache_mode = crate::backing::CacheMode::None;
    r.update_workspace(&changed).expect("update");
    drop(r);
    let r = Registry::open(dir.path()).expect("reopen is idempotent");
    let got = r.workspace("ws-old").expect("read").expect("present");
    assert_eq!(got.cache_mode, crate::backing::CacheMode::None);
    r.conn
        .execute("UPDATE workspaces SET cache_mode = 'bogus'", [])
        .expect("corrupt it");
    assert!(matches!(r.workspaces(), Err(RegistryError::Corrupt(_))));
}
