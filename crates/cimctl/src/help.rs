//! `cimctl --help` for a person: the top-level commands in groups by what they are for (clap
//! lists subcommands under one heading only, so the list is rendered here into the template).

use std::fmt::Write as _;

/// The groups, in the order `--help` shows them; every command must be named here (a unit
/// test checks).
const GROUPS: &[(&str, &[&str])] = &[
    ("Start a leaf node on this machine", &["up"]),
    ("Information units", &["iu"]),
    ("Pipelines", &["pipeline", "run"]),
    ("Plugins", &["plugin"]),
    ("Status, nodes and placement", &["status", "node", "placement", "registry"]),
    ("Archive and restore", &["archive", "restore"]),
    ("Integration", &["integration"]),
    ("Access and deployment", &["token", "deploy"]),
];

/// The group `name` belongs in, if any.
fn group_of(name: &str) -> Option<&'static str> {
    GROUPS.iter().find(|(_, names)| names.contains(&name)).map(|(heading, _)| *heading)
}

/// The width the command list is wrapped to.
const COLUMNS: usize = 100;

/// `text` in lines of at most `width` columns (a longer word stays whole), the lines after the
/// first indented by `indent`.
fn wrap(text: &str, width: usize, indent: usize) -> String {
    let mut lines: Vec<String> = vec![String::new()];
    for word in text.split_whitespace() {
        let line = lines.last_mut().expect("one line at least");
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(word.to_string());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines.join(&format!("\n{}", " ".repeat(indent)))
}

/// `cmd` with a help template that lists its subcommands in their groups.
pub fn grouped(cmd: clap::Command) -> clap::Command {
    let subs: Vec<(String, String)> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| (s.get_name().to_string(), s.get_about().map(|a| a.to_string()).unwrap_or_default()))
        .collect();
    let width = subs.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let mut list = String::new();
    for (heading, names) in GROUPS {
        let members: Vec<&(String, String)> = names.iter().filter_map(|n| subs.iter().find(|(s, _)| s == n)).collect();
        if members.is_empty() {
            continue;
        }
        let _ = writeln!(list, "{heading}:");
        for (name, about) in members {
            let _ = writeln!(list, "  {name:<width$}  {}", wrap(about, COLUMNS - width - 4, width + 4));
        }
        list.push('\n');
    }
    let ungrouped: Vec<&str> = subs.iter().filter(|(n, _)| group_of(n).is_none()).map(|(n, _)| n.as_str()).collect();
    if !ungrouped.is_empty() {
        let _ = writeln!(list, "Other:\n  {}\n", ungrouped.join(", "));
    }
    let template = format!(
        "{{before-help}}{{about-with-newline}}\n{{usage-heading}} {{usage}}\n\n{list}Options:\n{{options}}\n\n\
         Run `cimctl <COMMAND> --help` for a command's subcommands and options.{{after-help}}"
    );
    cmd.help_template(template)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every argument and option of `cmd` and of its subcommands, depth first, that has no help
    /// text, as `cimctl iu show <ID>`.
    fn undocumented(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        let path = format!("{path} {}", cmd.get_name()).trim().to_string();
        if cmd.get_about().is_none() && cmd.get_long_about().is_none() {
            out.push(format!("{path} (the command itself)"));
        }
        for arg in cmd.get_arguments() {
            use clap::ArgAction::{Help, HelpLong, HelpShort, Version};
            let builtin = matches!(arg.get_action(), Help | HelpShort | HelpLong | Version);
            if builtin || arg.is_hide_set() {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                let name = match (arg.get_long(), arg.get_value_names()) {
                    (Some(long), _) => format!("--{long}"),
                    (None, Some(names)) => names.iter().map(|n| format!("<{n}>")).collect::<Vec<_>>().join(" "),
                    (None, None) => arg.get_id().to_string(),
                };
                out.push(format!("{path} {name}"));
            }
        }
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            undocumented(sub, &path, out);
        }
    }

    #[test]
    fn every_option_and_argument_says_what_it_is_for() {
        let mut cmd = crate::Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        undocumented(&cmd, "", &mut missing);
        assert!(missing.is_empty(), "give these a doc comment (their `--help` text):\n  {}", missing.join("\n  "));
    }

    #[test]
    fn every_command_is_in_a_group_and_help_shows_the_groups() {
        let cmd = crate::Cli::command();
        for sub in cmd.get_subcommands() {
            assert!(group_of(sub.get_name()).is_some(), "add `{}` to a group in help.rs", sub.get_name());
        }
        for (_, names) in GROUPS {
            for name in *names {
                assert!(cmd.find_subcommand(name).is_some(), "help.rs groups `{name}`, which is no command");
            }
        }
        let help = grouped(crate::Cli::command()).render_help().to_string();
        let at = |needle: &str| help.find(needle).unwrap_or_else(|| panic!("{needle:?} not in:\n{help}"));
        assert!(at("Information units:\n  iu ") < at("Pipelines:\n  pipeline "), "{help}");
        assert!(at("Pipelines:\n") < at("\n  run "), "{help}");
        assert!(at("Archive and restore:\n") < at("\n  restore "), "{help}");
        assert!(at("Status, nodes and placement:\n") < at("\n  node "), "{help}");
        at("Start a leaf node on this machine:\n  up ");
        at("Options:\n");
        assert!(!help.contains("Commands:"), "the groups replace clap's one list:\n{help}");
        for line in help.lines() {
            assert!(line.chars().count() <= COLUMNS, "line too long: {line}");
        }
        assert_eq!(wrap("aa bb cc", 5, 2), "aa bb\n  cc");
    }
}
