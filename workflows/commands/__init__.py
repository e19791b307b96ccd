"""One module per `bertflow` verb: add_arguments(parser) + run(args), or main(argv)."""
