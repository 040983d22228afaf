"""ragbeam's driver: command line, options and pipeline construction."""
