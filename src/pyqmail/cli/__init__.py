"""Command-line programs: one thin ``main(argv) -> int`` per qmail command name."""
