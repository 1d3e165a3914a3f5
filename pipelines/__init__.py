"""Where data enters and jobs run: sources, ingest, prediction, evaluation, retraining, the
daemon and its HTTP app, and the `forecaster` command line (cli, cli_show, cli_run)."""
