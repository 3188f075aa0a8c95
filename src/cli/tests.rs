//! Parser tests: every definition is consistent, global options parse before and after
//! the verb, and `--help`/`--version` show what the AWS CLI user expects.

use super::*;
use clap::CommandFactory;

fn parse(args: &[&str]) -> Cli {
    Cli::try_parse_from(std::iter::once("sealvol").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{args:?} should parse: {e}"))
}

/// Every subcommand's arguments are consistent (unique names, valid relations): clap
/// checks this only when a subcommand is parsed, so check them all here.
#[test]
fn cli_definitions_are_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn global_options_parse_before_the_verb() {
    let cli = parse(&[
        "--profile",
        "alice",
        "--output",
        "json",
        "--region",
        "eu-west-1",
        "--endpoint-url",
        "http://127.0.0.1:4599",
        "--state-dir",
        "/tmp/s",
        "--service-profile",
        "svc",
        "--ebs-profile",
        "blk",
        "describe-workspaces",
    ]);
    let g = &cli.global;
    assert_eq!(g.profile, "alice");
    assert_eq!(g.output, Output::Json);
    assert_eq!(
        g.kms_target(),
        crate::kms::KmsTarget {
            region: Some("eu-west-1".into()),
            endpoint_url: Some("http://127.0.0.1:4599".into()),
        }
    );
    let cfg = g.controller_config();
    assert_eq!(cfg.state_dir, PathBuf::from("/tmp/s"));
    assert_eq!(cfg.admin_profile, "alice");
    assert_eq!(cfg.service_profile, "svc");
    assert_eq!(cfg.ebs_profile, "blk");
    assert_eq!(cfg.kms, g.kms_target());
    assert!(matches!(
        cli.command,
        Cmd::Workspace(workspaces::WorkspaceCmd::DescribeWorkspaces { .. })
    ));
}

#[test]
fn global_options_parse_after_the_verb() {
    let cli = parse(&[
        "describe-workspaces",
        "--workspace-ids",
        "ws-1",
        "--profile",
        "alice",
        "--output",
        "json",
        "--endpoint-url",
        "http://h:1",
        "--region",
        "us-west-2",
    ]);
    assert_eq!(cli.global.profile, "alice");
    assert_eq!(cli.global.output, Output::Json);
    assert_eq!(cli.global.endpoint_url.as_deref(), Some("http://h:1"));
    assert_eq!(cli.global.region.as_deref(), Some("us-west-2"));
    match cli.command {
        Cmd::Workspace(workspaces::WorkspaceCmd::DescribeWorkspaces { workspace_ids }) => {
            assert_eq!(workspace_ids, ["ws-1"]);
        }
        other => panic!("parsed as {other:?}"),
    }
}

#[test]
fn global_options_split_around_the_verb_combine() {
    let cli = parse(&[
        "--profile",
        "alice",
        "stop-workspaces",
        "--workspace-ids",
        "ws-1",
        "--output",
        "json",
    ]);
    assert_eq!(cli.global.profile, "alice");
    assert_eq!(cli.global.output, Output::Json);
}

/// Given both before and after the verb, the one after wins (clap's rule for globals).
#[test]
fn a_global_option_after_the_verb_wins_over_one_before() {
    let cli = parse(&[
        "--output",
        "table",
        "--endpoint-url",
        "http://before:1",
        "describe-workspaces",
        "--output",
        "json",
        "--endpoint-url",
        "http://after:2",
    ]);
    assert_eq!(cli.global.output, Output::Json);
    assert_eq!(cli.global.endpoint_url.as_deref(), Some("http://after:2"));
}

#[test]
fn a_global_option_twice_on_the_same_side_is_refused() {
    let e = Cli::try_parse_from([
        "sealvol",
        "describe-workspaces",
        "--output",
        "json",
        "--output",
        "table",
    ])
    .expect_err("twice after the verb");
    assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
}

#[test]
fn single_volume_verbs_take_output_on_either_side() {
    for args in [
        &["--output", "json", "describe-volume", "--path", "/v"][..],
        &["describe-volume", "--path", "/v", "--output", "json"][..],
    ] {
        let cli = parse(args);
        assert_eq!(cli.global.output, Output::Json, "{args:?}");
    }
    let cli = parse(&["bench", "--seconds", "0.1"]);
    assert_eq!(cli.global.output, Output::Table);
}

/// The spelling the existing tests and the README use: profiles and output after a
/// WorkSpace rekey.
#[test]
fn rekey_volume_of_a_workspace_takes_the_global_options() {
    let cli = parse(&[
        "rekey-volume",
        "--workspace-id",
        "ws-1",
        "--profile",
        "alice",
        "--state-dir",
        "/s",
        "--output",
        "json",
    ]);
    assert_eq!(cli.global.profile, "alice");
    assert_eq!(cli.global.state_dir, PathBuf::from("/s"));
    assert_eq!(cli.global.output, Output::Json);
}

/// What the controller passes to the agents it starts parses.
#[test]
fn the_agent_command_line_parses() {
    let cli = parse(&[
        "agent",
        "--state-dir",
        "/s",
        "--workspace-id",
        "ws-1",
        "--ebs-profile",
        "ebs2",
        "--region",
        "eu-west-1",
        "--endpoint-url",
        "http://127.0.0.1:1",
    ]);
    assert_eq!(cli.global.ebs_profile, "ebs2");
    assert_eq!(cli.global.state_dir, PathBuf::from("/s"));
    assert_eq!(cli.global.region.as_deref(), Some("eu-west-1"));
    assert_eq!(
        cli.global.endpoint_url.as_deref(),
        Some("http://127.0.0.1:1")
    );
}

fn arg(id: &str) -> clap::Arg {
    Cli::command()
        .get_arguments()
        .find(|a| a.get_id() == id)
        .unwrap_or_else(|| panic!("no argument {id}"))
        .clone()
}

/// The environment fallbacks (read by clap when the flag is absent) and defaults. Region
/// and endpoint have none here: the AWS SDK reads AWS_REGION, AWS_DEFAULT_REGION and
/// AWS_ENDPOINT_URL_KMS itself, so the flag only overrides.
#[test]
fn global_options_fall_back_to_the_environment_then_the_default() {
    for (id, env, default) in [
        ("profile", Some("AWS_PROFILE"), Some("default")),
        (
            "state_dir",
            Some("SEALVOL_STATE_DIR"),
            Some("/var/lib/sealvol"),
        ),
        (
            "service_profile",
            Some("SEALVOL_SERVICE_PROFILE"),
            Some("workspaces"),
        ),
        ("ebs_profile", Some("SEALVOL_EBS_PROFILE"), Some("ebs")),
        ("output", None, Some("table")),
        ("region", None, None),
        ("endpoint_url", None, None),
    ] {
        let a = arg(id);
        assert!(a.is_global_set(), "{id} is global");
        assert_eq!(
            a.get_env().and_then(|e| e.to_str()),
            env,
            "{id}'s environment variable"
        );
        assert_eq!(
            a.get_default_values().first().and_then(|v| v.to_str()),
            default,
            "{id}'s default"
        );
    }
}

#[test]
fn help_lists_the_global_options_once_under_their_heading() {
    let help = Cli::command().render_help().to_string();
    assert!(help.contains("Global options:"), "{help}");
    for flag in [
        "--profile",
        "--output",
        "--region",
        "--endpoint-url",
        "--state-dir",
        "--service-profile",
        "--ebs-profile",
    ] {
        assert_eq!(
            help.matches(&format!("{flag} ")).count(),
            1,
            "{flag} once in:\n{help}"
        );
    }
    let heading = help.find("Global options:").expect("heading");
    assert!(help[heading..].contains("--endpoint-url"), "{help}");
}

#[test]
fn version_prints_the_name_and_the_crate_version() {
    assert_eq!(
        Cli::command().render_version().to_string(),
        format!("sealvol {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn an_unusable_endpoint_url_is_a_usage_error_naming_it() {
    let e = Cli::try_parse_from([
        "sealvol",
        "--endpoint-url",
        "localhost:4599",
        "describe-workspaces",
    ])
    .expect_err("no scheme");
    assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
    let msg = e.to_string();
    assert!(
        msg.contains("localhost:4599") && msg.contains("--endpoint-url"),
        "{msg}"
    );
}
