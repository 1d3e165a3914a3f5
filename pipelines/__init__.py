"""Where data enters and jobs run: sources, ingest, and (later) the scheduler and daemon."""
