"""One module per `bertflow` verb: build_parser() + run(args) (see workflows.cli)."""
