"""One module per `qn` subcommand; see qn_cli.main."""
